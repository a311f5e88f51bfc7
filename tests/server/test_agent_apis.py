"""OpenAI Responses and Anthropic Messages over HTTP, on the bundled SmolLM2 with the chat template
that shows it tools: the providers' own SDKs (openai, anthropic), the OpenAI Agents SDK and
LangChain's ChatAnthropic as clients; every Responses body and stream event checked against
OpenAI's published schema; greedy text equal to chat completions' for the same conversation,
token for token; streams that add up to the whole answer; errors in each provider's shape."""
from __future__ import annotations

import asyncio
import json

import anthropic
import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from tests.server.launch import wait_idle
from tests.server.openai_schema import validate

SYSTEM = "You are a geography teacher."
ASK = "What is the capital of France?"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
           "additionalProperties": False}
TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city now", "parameters": WEATHER}
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def base(tool_server):
    return tool_server


@pytest.fixture(scope="module")
def oai(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def claude(base):
    return anthropic.Anthropic(base_url=base, api_key="none", max_retries=0)


def _events(base: str, path: str, body: dict) -> list[tuple[str | None, dict]]:
    """A raw SSE stream: (event name, data) in order."""
    out, name = [], None
    with httpx.stream("POST", f"{base}{path}", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[len("data: "):])))
                name = None
    return out


def _chat(oai, messages: list[dict], **kw):
    return oai.chat.completions.create(model="smol", messages=messages, **GREEDY, **kw)


# --- one engine, three front ends -------------------------------------------------------------
def test_greedy_text_is_chats_token_for_token_on_every_route(oai, claude):
    chat = _chat(oai, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK}], max_tokens=24,
                 logprobs=True)
    tokens = [e.token for e in chat.choices[0].logprobs.content]
    response = oai.responses.create(model="smol", instructions=SYSTEM, input=ASK, max_output_tokens=24, **GREEDY,
                                    include=["message.output_text.logprobs"])
    assert [e.token for e in response.output[0].content[0].logprobs] == tokens
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    message = claude.messages.create(model="smol", system=SYSTEM, max_tokens=24, extra_body=GREEDY,
                                     messages=[{"role": "user", "content": ASK}])
    assert message.content[0].text == chat.choices[0].message.content
    assert message.usage.output_tokens == chat.usage.completion_tokens
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert message.stop_reason == ("end_turn" if chat.choices[0].finish_reason == "stop" else "max_tokens")


def test_a_continued_conversation_is_chats_with_the_whole_history(oai, claude):
    first = oai.responses.create(model="smol", input=ASK, max_output_tokens=16, **GREEDY)
    second = oai.responses.create(model="smol", input="And of Italy?", previous_response_id=first.id,
                                  max_output_tokens=16, **GREEDY)
    history = [{"role": "user", "content": ASK}, {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "And of Italy?"}]
    chat = _chat(oai, history, max_tokens=16)
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.usage.input_tokens_details.cached_tokens > 0  # the first turn's blocks were reused
    message = claude.messages.create(model="smol", max_tokens=16, messages=history, extra_body=GREEDY)
    assert message.content[0].text == chat.choices[0].message.content


# --- Responses ---------------------------------------------------------------------------------
def test_responses_whole_and_streamed_follow_the_schema_and_add_up(base):
    body = {"model": "smol", "input": ASK, "max_output_tokens": 20, "include": ["message.output_text.logprobs"],
            "top_logprobs": 2, **GREEDY}
    whole = httpx.post(f"{base}/v1/responses", json=body, timeout=60).json()
    validate(whole, "Response")
    events = _events(base, "/v1/responses", {**body, "stream": True})
    for name, event in events:
        assert name == event["type"]
        validate(event, "ResponseStreamEvent")
    assert [e["sequence_number"] for _, e in events] == list(range(len(events)))
    kinds = [e["type"] for _, e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    final = events[-1][1]["response"]
    deltas = [e for _, e in events if e["type"] == "response.output_text.delta"]
    part = final["output"][0]["content"][0]
    assert "".join(e["delta"] for e in deltas) == part["text"] == whole["output"][0]["content"][0]["text"]
    assert [lp["token"] for e in deltas for lp in e["logprobs"]] == [lp["token"] for lp in part["logprobs"]]
    assert [lp["token"] for lp in part["logprobs"]] == [lp["token"] for lp in whole["output"][0]["content"][0][
        "logprobs"]]
    assert all(len(lp["top_logprobs"]) == 2 for lp in part["logprobs"])
    assert final["usage"] == whole["usage"] | {"input_tokens_details": final["usage"]["input_tokens_details"]}


def test_the_sdks_stream_helper_and_a_cut_response(oai, base):
    with oai.responses.stream(model="smol", input=ASK, max_output_tokens=30, **GREEDY) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == final.output_text and final.status == "completed" and final.output[0].status == "completed"
    # cut by max_output_tokens: incomplete, whole and streamed alike (the SDK's helper wants a completed one)
    body = {"model": "smol", "input": "Tell me a long story.", "max_output_tokens": 12, **GREEDY}
    whole = oai.responses.create(**body)
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    assert whole.output[0].status == "incomplete" and whole.usage.output_tokens == 12
    name, last = _events(base, "/v1/responses", {**body, "stream": True})[-1]
    assert name == "response.incomplete" and last["response"]["output"][0]["content"][0]["text"] == whole.output_text
    assert last["response"]["output"][0]["status"] == "incomplete"


class City(BaseModel):
    city: str
    population: int


def test_responses_parse_with_a_pydantic_model(oai):
    out = oai.responses.parse(model="smol", input="Name a city and its population.", text_format=City,
                              max_output_tokens=60, **GREEDY)
    assert isinstance(out.output_parsed, City)
    plain = oai.responses.create(model="smol", input="Name a city and its population.", max_output_tokens=60,
                                 text={"format": {"type": "json_object"}}, **GREEDY)
    assert isinstance(json.loads(plain.output_text), dict)


def test_a_function_tool_round_trip(oai, base):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = oai.responses.create(model="smol", input=ask, tools=[TOOL], tool_choice="required",
                                 parallel_tool_calls=False, max_output_tokens=60, **GREEDY)
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    validate(httpx.get(f"{base}/v1/responses/{first.id}").json(), "Response")
    answer = [call.model_dump(exclude_none=True), {"type": "function_call_output", "call_id": call.call_id,
                                                   "output": "18 C and sunny"}]
    second = oai.responses.create(model="smol", input=ask + answer, tools=[TOOL], max_output_tokens=30, **GREEDY)
    chat_history = ask + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "18 C and sunny"}]
    chat = _chat(oai, chat_history, tools=[{"type": "function", "function": {k: v for k, v in TOOL.items()
                                                                              if k != "type"}}], max_tokens=30)
    assert second.output_text == (chat.choices[0].message.content or "")
    assert second.usage.input_tokens == chat.usage.prompt_tokens  # the call and its result reached the template
    streamed = _events(str(oai.base_url).removesuffix("/v1/"), "/v1/responses",
                       {"model": "smol", "input": ask, "tools": [TOOL], "tool_choice": "required",
                        "parallel_tool_calls": False, "max_output_tokens": 60, "stream": True, **GREEDY})
    args = "".join(e["delta"] for _, e in streamed if e["type"] == "response.function_call_arguments.delta")
    done = [e for _, e in streamed if e["type"] == "response.function_call_arguments.done"]
    assert args == done[0]["arguments"] == call.arguments and done[0]["name"] == "get_weather"
    for _, event in streamed:
        validate(event, "ResponseStreamEvent")


def test_stored_responses_are_listed_retrieved_deleted_or_not_kept(oai, base):
    kept = oai.responses.create(model="smol", input=[{"role": "user", "content": "Hi"}, {"role": "assistant",
                                "content": "Hello!"}, {"role": "user", "content": ASK}], max_output_tokens=4)
    items = httpx.get(f"{base}/v1/responses/{kept.id}/input_items").json()
    validate(items, "ResponseItemList")
    assert [i["content"][0]["text"] for i in items["data"]] == [ASK, "Hello!", "Hi"]  # newest first
    page = oai.responses.input_items.list(kept.id, order="asc", limit=2)
    assert [i.content[0].text for i in page.data] == ["Hi", "Hello!"] and page.has_more
    rest = oai.responses.input_items.list(kept.id, order="asc", after=page.data[-1].id)
    assert [i.content[0].text for i in rest.data] == [ASK] and not rest.has_more
    assert oai.responses.retrieve(kept.id).output_text == kept.output_text
    oai.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(kept.id)
    not_kept = oai.responses.create(model="smol", input="Hi", max_output_tokens=2, store=False)
    r = httpx.get(f"{base}/v1/responses/{not_kept.id}")
    assert r.status_code == 404
    validate(r.json(), "ErrorResponse")
    r = httpx.post(f"{base}/v1/responses", json={"input": "x", "previous_response_id": not_kept.id})
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"


def test_the_agents_sdk_calls_the_tool_and_uses_its_result(base):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city now."""
        calls.append(city)
        return f"18 C and sunny in {city}"

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    agent = Agent(name="weather", instructions="You answer questions about the weather.", tools=[get_weather],
                  model=OpenAIResponsesModel(model="smol", openai_client=client),
                  model_settings=ModelSettings(temperature=0, tool_choice="required", max_tokens=120))

    async def run() -> tuple[str, str]:
        whole = await Runner.run(agent, "What is the weather in Paris?", max_turns=3)
        streamed = Runner.run_streamed(agent, "What is the weather in Paris?", max_turns=3)
        async for _ in streamed.stream_events():
            pass
        return whole.final_output, streamed.final_output

    whole, streamed = asyncio.run(run())
    assert calls and all(city == "Paris" for city in calls)
    assert "18 C and sunny in Paris" in whole and streamed == whole  # the tool's result reached the answer


@pytest.mark.parametrize("body,status,param", [
    ({"input": 3}, 400, "input"),
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, 400, "input.0"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400,
     "input.0.content.0.type"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, 400, "tools.0.type"),
    ({"input": "x", "tools": [TOOL], "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}}, 400,
     "tool_choice"),
    ({"input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"input": "x", "include": ["file_search_call.results"]}, 400, "include.0"),
    ({"input": "x", "frobnicate": 1}, 400, "frobnicate"),
    ({"input": "x", "background": True}, 400, "background"),
    ({"input": "x", "truncation": "auto"}, 400, "truncation"),
    ({"input": "x", "top_k": -5}, 400, "top_k"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}}, 400, "text.format.name"),
    ({"input": "x", "tool_choice": "required"}, 400, "tool_choice"),
    ({"input": "x", "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
    ({"input": "x", "model": "gpt-5"}, 404, "model"),
])
def test_bad_responses_requests_are_openai_shaped(base, body, status, param):
    r = httpx.post(f"{base}/v1/responses", json=body, timeout=30)
    assert r.status_code == status, r.text
    validate(r.json(), "ErrorResponse")
    assert r.json()["error"]["param"] == param, r.text


def test_the_stored_response_routes_say_what_they_take(base):
    r = httpx.put(f"{base}/v1/responses/resp_x")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"  # every method of the path
    r = httpx.get(f"{base}/v1/responses/resp_x", params={"stream": "true"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    r = httpx.get(f"{base}/v1/responses/resp_x/input_items", params={"limit": 0})
    assert r.status_code == 400
    spec = httpx.get(f"{base}/openapi.json").json()
    errors = spec["paths"]["/v1/messages"]["post"]["responses"]
    assert errors["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/AnthropicError")
    assert "529" in errors and "503" not in errors
    assert spec["paths"]["/v1/responses"]["post"]["responses"]["400"]["content"]["application/json"]["schema"][
        "$ref"].endswith("/ErrorResponse")


# --- Messages ----------------------------------------------------------------------------------
def test_messages_with_system_stop_sequences_and_turns(claude, oai):
    chat = _chat(oai, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK}], max_tokens=24)
    text = chat.choices[0].message.content
    cut = text.split()[2]
    out = claude.messages.create(model="smol", system=[{"type": "text", "text": SYSTEM}], max_tokens=24,
                                 stop_sequences=[cut], messages=[{"role": "user", "content": ASK}], extra_body=GREEDY)
    assert out.stop_reason == "stop_sequence" and out.stop_sequence == cut
    assert out.content[0].text == text[:text.index(cut)]
    assert out.id.startswith("msg_") and out.model == "smol" and out.role == "assistant"


def test_a_messages_stream_adds_up_to_the_whole_message(claude, base):
    kw = dict(model="smol", max_tokens=20, messages=[{"role": "user", "content": "Tell me a joke."}],
              extra_body=GREEDY)
    whole = claude.messages.create(**kw)
    with claude.messages.stream(**kw) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    names = [name for name, _ in _events(base, "/v1/messages", {**{k: v for k, v in kw.items() if k != "extra_body"},
                                                                **GREEDY, "stream": True})]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_a_tool_use_round_trip_whole_and_streamed(claude, oai):
    tools = [{"name": "get_weather", "description": TOOL["description"], "input_schema": WEATHER}]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model="smol", max_tokens=60, tools=tools, tool_choice={"type": "any", "disable_parallel_tool_use": True},
              messages=ask, extra_body=GREEDY)
    first = claude.messages.create(**kw)
    [use] = first.content
    assert first.stop_reason == "tool_use" and use.type == "tool_use" and use.name == "get_weather"
    jsonschema.validate(use.input, WEATHER)
    with claude.messages.stream(**kw) as stream:
        streamed = stream.get_final_message()
    assert [(b.name, b.input) for b in streamed.content] == [(use.name, use.input)]
    history = ask + [{"role": "assistant", "content": [use.model_dump(exclude_none=True)]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                   "content": "18 C and sunny"}]}]
    second = claude.messages.create(model="smol", max_tokens=30, tools=tools, messages=history, extra_body=GREEDY)
    chat = _chat(oai, ask + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": use.id, "type": "function", "function": {"name": use.name, "arguments": json.dumps(use.input)}}]},
        {"role": "tool", "tool_call_id": use.id, "content": "18 C and sunny"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "description": TOOL["description"],
                                                 "parameters": WEATHER}}], max_tokens=30)
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert "".join(b.text for b in second.content if b.type == "text") == (chat.choices[0].message.content or "")


def test_count_tokens_is_the_templated_prompts_length(claude, base):
    tools = [{"name": "get_weather", "input_schema": WEATHER}]
    messages = [{"role": "user", "content": ASK}]
    counted = claude.messages.count_tokens(model="smol", system=SYSTEM, messages=messages, tools=tools)
    chat = [{"role": "system", "content": SYSTEM}, *messages]
    ids = httpx.post(f"{base}/tokenize", json={"messages": chat, "tools": [
        {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]}).json()["tokens"]
    assert counted.input_tokens == len(ids)


def test_langchains_chat_anthropic_pointed_at_kvserve(base, oai):
    from langchain_anthropic import ChatAnthropic
    from langchain_core.tools import tool

    llm = ChatAnthropic(model="smol", base_url=base, api_key="none", temperature=0, max_tokens=24, max_retries=0)
    expected = _chat(oai, [{"role": "user", "content": ASK}], max_tokens=24).choices[0].message.content
    assert llm.invoke(ASK).content == expected
    assert "".join(chunk.text for chunk in llm.stream(ASK)) == expected

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city now."""
        return "18 C"

    message = llm.bind_tools([get_weather], tool_choice="any").invoke("What is the weather in Paris?")
    assert [c["name"] for c in message.tool_calls] and all(c["name"] == "get_weather" for c in message.tool_calls)
    assert all(isinstance(c["args"].get("city"), str) for c in message.tool_calls)


@pytest.mark.parametrize("body,status,kind,needle", [
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error", "max_tokens"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400,
     "invalid_request_error", "'image' blocks"),
    ({"max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_request_error", "role"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "web_search_20250305", "name": "web_search"}]}, 400, "invalid_request_error", "server tool"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "temperature": 1.5}, 400,
     "invalid_request_error", "temperature"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "container": "c"}, 400,
     "invalid_request_error", "container"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "stop_sequences": ["a", "b", "c", "d", "e"]},
     400, "invalid_request_error", "stop_sequences"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "thinking": {"type": "enabled",
                                                                                    "budget_tokens": 2048}},
     400, "invalid_request_error", "budget_tokens"),
    ({"max_tokens": 5, "model": "claude-sonnet-9", "messages": [{"role": "user", "content": "x"}]}, 404,
     "not_found_error", "claude-sonnet-9"),
])
def test_bad_messages_requests_are_anthropic_shaped(base, body, status, kind, needle):
    r = httpx.post(f"{base}/v1/messages", json={"model": "smol", **body}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == kind and needle in error["error"]["message"]
    assert set(error) == {"type", "error"} and set(error["error"]) == {"type", "message"}


def test_the_anthropic_sdk_reads_our_errors(claude):
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model="smol", max_tokens=0, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize("path,body", [
    ("/v1/responses", {"input": "Tell me a very long story.", "max_output_tokens": 4000}),
    ("/v1/messages", {"model": "smol", "max_tokens": 4000, "messages": [{"role": "user",
                                                                          "content": "Tell me a very long story."}]}),
])
def test_a_client_gone_mid_stream_frees_its_blocks(base, path, body):
    with httpx.stream("POST", f"{base}{path}", json={**body, "stream": True, "ignore_eos": True}
                      if path == "/v1/responses" else {**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if "delta" in line:
                break
    wait_idle(base)
