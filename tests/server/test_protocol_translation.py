"""The parts of the Responses and Messages front ends that need no server: their conversations as
chat messages, an answer's blocks (streamed in every split, and whole), the reasoning-token count,
and the pings of a quiet stream."""
from __future__ import annotations

import asyncio
import json
import random
from types import SimpleNamespace

import pytest

from engine.core.outputs import CompletionOutput, RequestOutput
from engine.core.sampling_params import SamplingParams
from server.answer import AnswerStream, Blocks
from server.logprobs import TokenText
from server.prompting import ChatPrompt
from server.protocol_messages import MessagesRequest
from server.protocol_responses import ResponsesRequest
from server.reasoning import FORMATS as REASONING
from server.render_messages import with_pings
from server.render_responses import ResponseRender
from server.tool_calls import FORMATS as TOOLS


def test_responses_items_become_chat_messages_in_turns():
    body = ResponsesRequest.model_validate({"instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather "}, {"type": "input_text",
                                                                                   "text": "in Paris?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Hmm."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking.",
                                                               "annotations": [], "logprobs": []}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "18 C"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "14:05"}]},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Done."}]}]})
    messages = body.chat_request([]).message_dicts()
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Hmm.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "content": "18 C", "tool_call_id": "c1"},
        {"role": "tool", "content": "14:05", "tool_call_id": "c2"},
        {"role": "assistant", "content": "", "reasoning_content": "Done."}]


def test_messages_blocks_become_chat_messages_in_turns():
    body = MessagesRequest.model_validate({"model": "m", "max_tokens": 5, "system": [{"type": "text", "text": "S"}],
                                           "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "Hmm.", "signature": ""},
                                          {"type": "text", "text": "Checking."},
                                          {"type": "tool_use", "id": "t1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": [{"type": "text", "text": "18 C"}]},
                                     {"type": "tool_result", "tool_use_id": "t2", "content": "timeout",
                                      "is_error": True},
                                     {"type": "text", "text": "Thanks", "cache_control": {"type": "ephemeral"}}]}]})
    chat = body.chat_request()
    assert chat.message_dicts() == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Hmm.", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C", "tool_call_id": "t1"},
        {"role": "tool", "content": "Error: timeout", "tool_call_id": "t2"}, {"role": "user", "content": "Thanks"}]
    assert chat.max_completion_tokens == 5


@pytest.mark.parametrize("choice,chat_choice,parallel", [
    ({"type": "auto"}, "auto", None), ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
    ({"type": "none"}, "none", None), ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}},
                                       None)])
def test_messages_tool_choices_are_chats(choice, chat_choice, parallel):
    body = MessagesRequest.model_validate({"model": "m", "max_tokens": 5, "tool_choice": choice,
                                           "messages": [{"role": "user", "content": "x"}],
                                           "tools": [{"name": "f", "input_schema": {"type": "object"}}]})
    chat = body.chat_request()
    expected = chat_choice if isinstance(chat_choice, str) else chat_choice["function"]["name"]
    assert chat.tool_choice_mode() == (None if expected == "none" else expected)
    assert chat.parallel_tool_calls is parallel


# hermes-style output: text, two calls, more text
TEXT = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')


def _blocks(pieces: list[str]) -> list[tuple]:
    answer, blocks, events = AnswerStream(None, False, TOOLS["hermes"]), Blocks(), []
    for i, piece in enumerate(pieces):
        events += blocks.feed(answer.feed(piece, final=i == len(pieces) - 1))
    events += blocks.close()
    open_ = [e for e in events if e[0] == "open"]
    assert len(open_) == len(blocks.blocks) and [e for e in events if e[0] == "close"][-1][1] is blocks.blocks[-1]
    return [(b.kind, b.text, b.name) for b in blocks.blocks]


def test_blocks_are_the_same_whole_and_streamed_in_any_split():
    whole = _blocks([TEXT])
    assert whole == [("text", "Let me check.", None), ("call", '{"city": "Paris"}', "get_weather"),
                     ("call", '{"zone": "CET"}', "get_time")]
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(TEXT)), rng.randint(1, 30)))
        assert _blocks([TEXT[a:b] for a, b in zip([0, *cuts], [*cuts, len(TEXT)])]) == whole
    assert _blocks(list(TEXT)) == whole


def test_no_delta_comes_after_its_blocks_close():
    """Also where one piece ends a call and starts the text after it (that text opens a block of its
    own, before or after the next call: a piece does not say where its text stood among its calls;
    a whole answer's text is one block, before its calls)."""
    text = TEXT + " Done."
    rng = random.Random(1)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 8)))
        answer, blocks, closed = AnswerStream(None, False, TOOLS["hermes"]), Blocks(), set()
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        for i, piece in enumerate(pieces):
            for change, block, *_ in blocks.feed(answer.feed(piece, final=i == len(pieces) - 1)):
                assert block.index not in closed
                if change == "close":
                    closed.add(block.index)
        calls = [(b.name, b.text) for b in blocks.blocks if b.kind == "call"]
        assert calls == [("get_weather", '{"city": "Paris"}'), ("get_time", '{"zone": "CET"}')]
        assert "".join(b.text for b in blocks.blocks if b.kind == "text") == "Let me check.Done."


def test_reasoning_tokens_count_to_the_one_that_closes_the_thinking(smollm2_tokenizer):
    ctx = SimpleNamespace(reasoning=REASONING["qwen3"], token_text=TokenText(smollm2_tokenizer), model_name="m")
    ids = smollm2_tokenizer.encode("<think>It is Paris.</think>The answer: Paris.")
    chat = ChatPrompt([1, 2, 3], SamplingParams(), None, thinking=True)
    render = ResponseRender(ctx, ResponsesRequest.model_validate({"input": "x"}), chat)
    text = smollm2_tokenizer.decode(ids)
    render.feed(RequestOutput("r", None, [1, 2, 3], [], True), CompletionOutput(0, text, ids, "stop"))
    response = render.response()
    closing = next(n for n in range(1, len(ids) + 1) if "</think>" in smollm2_tokenizer.decode(ids[:n]))
    assert 1 < closing < len(ids)
    assert response["usage"]["output_tokens_details"]["reasoning_tokens"] == closing
    assert [(i["type"], i["content"][0]["text"]) for i in response["output"]] == [
        ("reasoning", "It is Paris."), ("message", "The answer: Paris.")]
    assert json.dumps(response)  # plain JSON throughout


def test_a_quiet_stream_gets_pings_and_then_its_items():
    async def run():
        release = asyncio.Event()

        async def slow():
            await release.wait()  # nothing comes until the consumer has seen a ping
            yield "item"

        got = []
        async for item in with_pings(slow(), interval=0.001):
            got.append(item)
            release.set()
        return got

    got = asyncio.run(run())
    assert got[-1] == "item" and set(got[:-1]) == {None} and len(got) >= 2


def test_leaving_a_pinged_stream_closes_its_source():
    async def run():
        closed = asyncio.Event()

        async def endless():
            try:
                while True:
                    await asyncio.sleep(3600)
                    yield "never"
            finally:
                closed.set()

        stream = with_pings(endless(), interval=0.001)
        assert await anext(stream) is None
        await stream.aclose()
        return closed.is_set()

    assert asyncio.run(run())


def test_anthropics_paths_answer_in_anthropics_shape_and_codes():
    from server.errors import APIError

    busy = APIError(503, "At capacity.", type_="service_unavailable")
    assert busy.response_for("/v1/messages") == (529, {"type": "error", "error": {
        "type": "overloaded_error", "message": "At capacity."}})
    assert busy.response_for("/v1/messages/count_tokens")[0] == 529
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/messagesx"):
        assert busy.response_for(path) == (503, busy.body())


def test_the_response_store_keeps_the_most_recently_used_within_its_bounds():
    from server.store import ResponseStore, Stored

    def entry(text: str) -> Stored:
        return Stored({"id": text, "text": text}, [], [])

    store = ResponseStore(max_responses=2)
    store.put("a", entry("a"))
    store.put("b", entry("b"))
    assert store.get("a") is not None  # a is now the most recently used
    store.put("c", entry("c"))
    assert (store.get("a"), store.get("b")) != (None, None) and store.get("b") is None and len(store) == 2
    assert store.delete("a") and not store.delete("a") and store.get("a") is None
    small = ResponseStore(max_responses=10, max_chars=2 * entry("x" * 100).size)
    for name in "pqr":
        small.put(name, entry(name * 100))
    assert small.get("p") is None and small.get("q") and small.get("r") and small.chars <= small.max_chars
    small.put("huge", entry("h" * 10_000))  # larger than the whole store: not kept, nothing evicted for it
    assert small.get("huge") is None and small.get("q") and len(small) == 2
    nothing = ResponseStore(max_responses=0)
    nothing.put("a", entry("a"))
    assert nothing.get("a") is None
