"""Tool calling over HTTP with the official openai SDK, on the bundled SmolLM2 served with the
tool-capable chat template shipped for it: required and named tool_choice give calls whose
arguments follow their schemas (whole, streamed through the SDK's stream helper, n=2, seeded);
"auto" leaves free text as the model writes it and holds any call it starts to a declared
function; history with calls and results renders through the template; bad requests are 400s
naming their field."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.server.test_tool_calls import TIME, WEATHER

TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
SCHEMAS = {"get_weather": WEATHER["parameters"], "get_time": TIME["parameters"]}
ASK = [{"role": "user", "content": "What is the weather in Paris, and what time is it there?"}]


@pytest.fixture(scope="module")
def client(tool_server):
    return openai.OpenAI(base_url=f"{tool_server}/v1", api_key="none", max_retries=0)


def _check_calls(calls, names=None) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_gives_calls_that_follow_their_schemas(client):
    out = client.chat.completions.create(model="smol", messages=ASK, tools=TOOLS, tool_choice="required",
                                         max_tokens=120, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    _check_calls(choice.message.tool_calls)


def test_a_named_function_is_the_one_call(client):
    out = client.chat.completions.create(model="smol", messages=ASK, tools=TOOLS, max_tokens=120, temperature=0,
                                         tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = out.choices[0].message.tool_calls
    assert len(calls) == 1
    _check_calls(calls, {"get_time"})


def test_parallel_tool_calls_false_makes_one_call(client):
    out = client.chat.completions.create(model="smol", messages=ASK, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False, max_tokens=120, temperature=0)
    assert len(out.choices[0].message.tool_calls) == 1


def test_the_sdks_stream_helper_assembles_the_same_calls_seeded_n2(client):
    # one call each: sampled, this small model goes on calling until max_tokens
    kw = dict(model="smol", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=1.0,
              seed=5, n=2, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kw)
    streamed: dict[int, dict[int, list[str]]] = {0: {}, 1: {}}
    reasons = {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                entry = streamed[c.index].setdefault(d.index, ["", ""])
                entry[0] += d.function.name or ""
                entry[1] += d.function.arguments or ""
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    for c in whole.choices:
        _check_calls(c.message.tool_calls)
        assert [[t.function.name, t.function.arguments] for t in c.message.tool_calls] == \
               [streamed[c.index][i] for i in sorted(streamed[c.index])]
        assert reasons[c.index] == c.finish_reason == "tool_calls"
    greedy = dict(model="smol", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=0)
    with client.chat.completions.stream(**greedy) as stream:  # the SDK's own accumulation, of parallel calls
        for _ in stream:
            pass
        final = stream.get_final_completion().choices[0]
    expected = client.chat.completions.create(**greedy).choices[0]
    assert len(final.message.tool_calls) > 1 and final.finish_reason == expected.finish_reason
    assert [(t.id[:5], t.function.name, t.function.arguments) for t in final.message.tool_calls] == \
           [(t.id[:5], t.function.name, t.function.arguments) for t in expected.message.tool_calls]


def _raw_completion(client, messages, tools) -> str:
    """The model's own greedy text for the prompt the chat route builds (no grammar, no parser)."""
    base = str(client.base_url).removesuffix("v1/")
    ids = httpx.post(f"{base}tokenize", json={"messages": messages, "tools": tools}).json()["tokens"]
    return client.completions.create(model="smol", prompt=ids, max_tokens=60, temperature=0).choices[0].text


@pytest.mark.parametrize("question", ["What is the weather in Paris?", "Tell me a joke about ducks.",
                                      "What time is it in Europe/Paris?"])
def test_auto_leaves_text_alone_and_holds_calls_to_the_tools(client, question):
    messages = [{"role": "user", "content": question}]
    out = client.chat.completions.create(model="smol", messages=messages, tools=TOOLS, max_tokens=60, temperature=0)
    message = out.choices[0].message
    raw = _raw_completion(client, messages, TOOLS)
    if "<tool_call>" not in raw:  # no call: the text is the model's own, token for token
        assert message.tool_calls is None and message.content == raw
        return
    # a call the model starts is held to a declared function and its schema; the text before stays
    assert out.choices[0].finish_reason == "tool_calls"
    _check_calls(message.tool_calls)
    assert (message.content or "") == raw[:raw.index("<tool_call>")].strip()


def test_some_auto_question_makes_a_call(client):
    """The case above that is not vacuous: this greedy answer starts a call (checked on the raw text)."""
    messages = [{"role": "user", "content": "What time is it in Europe/Paris?"}]
    assert "<tool_call>" in _raw_completion(client, messages, TOOLS)


def test_tool_choice_none_shows_the_tools_and_parses_nothing(client):
    messages = [{"role": "user", "content": "What time is it in Europe/Paris?"}]
    out = client.chat.completions.create(model="smol", messages=messages, tools=TOOLS, tool_choice="none",
                                         max_tokens=60, temperature=0)
    assert out.choices[0].message.tool_calls is None
    assert out.choices[0].message.content == _raw_completion(client, messages, TOOLS)


def test_history_with_calls_and_results_goes_through_the_template(client):
    first = client.chat.completions.create(model="smol", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=120, temperature=0).choices[0].message
    history = ASK + [first.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": "18 C and sunny" if c.function.name == "get_weather"
         else "14:05"} for c in first.tool_calls]
    base = str(client.base_url).removesuffix("v1/")
    ids = httpx.post(f"{base}tokenize", json={"messages": history, "tools": TOOLS}).json()["tokens"]
    prompt = httpx.post(f"{base}detokenize", json={"tokens": ids}).json()["prompt"]
    for c in first.tool_calls:
        assert f'{{"name": "{c.function.name}", "arguments": {json.dumps(json.loads(c.function.arguments))}}}' in prompt
    assert "<tool_response>\n18 C and sunny\n</tool_response>" in prompt or "14:05" in prompt
    answer = client.chat.completions.create(model="smol", messages=history, tools=TOOLS, max_tokens=30,
                                            temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("body,param", [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": TOOLS, "tool_choice": "required", "min_tokens": 3}, "min_tokens"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {
        "name": "get_time", "arguments": "{oops"}}]}]}, "messages.0.tool_calls.0.function.arguments"),
    ({"messages": [{"role": "user", "tool_calls": [{"id": "a", "type": "function", "function": {
        "name": "get_time", "arguments": "{}"}}]}]}, "messages.0.tool_calls"),
])
def test_bad_tool_requests_are_400_naming_the_field(client, body, param):
    r = httpx.post(f"{client.base_url}chat/completions", json={"model": "smol", "messages": ASK, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_tools_are_refused_on_completions(client):
    r = httpx.post(f"{client.base_url}completions", json={"model": "smol", "prompt": "x", "tools": TOOLS})
    assert r.status_code == 400 and "tools" in r.json()["error"]["message"]
