"""The OpenAI schema validator itself (no server, no model): hand-written OpenAI-shaped bodies pass, and a missing
required field, a null the spec does not allow, or a wrong enum value fails, naming where."""
import copy
import json

import pytest
from jsonschema import ValidationError

from tests.server.openai_schema import FILE, schemas, validate, validator


def chat_completion():
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "tiny",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!", "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


def chat_chunk():
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "tiny",
            "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None, "logprobs": None}],
            "usage": None}


def message_item():
    return {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": "Hello!", "annotations": [], "logprobs": []}]}


def response():
    usage = {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
             "output_tokens": 9, "output_tokens_details": {"reasoning_tokens": 3}, "total_tokens": 14}
    function_call = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
                     "arguments": '{"city": "Paris"}', "status": "completed"}
    reasoning = {"type": "reasoning", "id": "rs_1", "summary": [],
                 "content": [{"type": "reasoning_text", "text": "The user greets me."}]}
    tool = {"type": "function", "name": "get_weather", "description": "Weather in a city", "strict": True,
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    return {"id": "resp_1", "object": "response", "created_at": 1700000000, "status": "completed",
            "completed_at": 1700000001, "error": None, "incomplete_details": None, "instructions": None,
            "max_output_tokens": None, "model": "tiny", "output": [reasoning, message_item(), function_call],
            "parallel_tool_calls": True, "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
            "temperature": 1.0, "text": {"format": {"type": "text"}, "verbosity": "medium"}, "tool_choice": "auto",
            "tools": [tool], "top_p": 1.0, "truncation": "disabled", "usage": usage, "metadata": {}}


def text_delta():
    return {"type": "response.output_text.delta", "sequence_number": 4, "item_id": "msg_1", "output_index": 1,
            "content_index": 0, "delta": "Hel", "logprobs": []}


def changed(body, path, value=None, drop=False):
    """A copy of `body` with the field at `path` (keys and indices) set to `value`, or dropped."""
    body = copy.deepcopy(body)
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    if drop:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return body


def test_chat_completion_passes_and_needs_refusal():
    validate(chat_completion(), "CreateChatCompletionResponse")
    # `refusal` is required (string or null) in ChatCompletionResponseMessage
    with pytest.raises(ValidationError, match=r"^\$\.choices\[0\]\.message: 'refusal' is a required property"):
        validate(changed(chat_completion(), ["choices", 0, "message", "refusal"], drop=True),
                 "CreateChatCompletionResponse")


def test_chat_completion_wrong_values_fail():
    with pytest.raises(ValidationError, match=r"\$\.choices\[0\]\.finish_reason: 'done' is not one of"):
        validate(changed(chat_completion(), ["choices", 0, "finish_reason"], "done"), "CreateChatCompletionResponse")
    with pytest.raises(ValidationError, match=r"\$\.choices\[0\]: 'logprobs' is a required property"):
        validate(changed(chat_completion(), ["choices", 0, "logprobs"], drop=True), "CreateChatCompletionResponse")


def test_nullable_true_accepts_null_and_nothing_else():
    # The chat chunk's finish_reason, logprobs and usage carry 3.0's `nullable: true`.
    assert schemas()["CreateChatCompletionStreamResponse"]["properties"]["usage"]["anyOf"][1] == {"type": "null"}
    validate(chat_chunk(), "CreateChatCompletionStreamResponse")
    validate(changed(chat_chunk(), ["choices", 0, "finish_reason"], "stop"), "CreateChatCompletionStreamResponse")
    with pytest.raises(ValidationError, match=r"\$\.choices\[0\]\.finish_reason"):
        validate(changed(chat_chunk(), ["choices", 0, "finish_reason"], "done"), "CreateChatCompletionStreamResponse")
    with pytest.raises(ValidationError, match=r"\$\.usage"):
        validate(changed(chat_chunk(), ["usage"], {"prompt_tokens": 1}), "CreateChatCompletionStreamResponse")


def test_response_passes():
    validate(response(), "Response")


@pytest.mark.parametrize("path", [["tools"], ["error"], ["output", 1, "status"], ["output", 2, "call_id"],
                                  ["output", 1, "content", 0, "logprobs"], ["output", 0, "summary"],
                                  ["usage", "output_tokens_details", "reasoning_tokens"]])
def test_response_without_a_required_field_fails(path):
    with pytest.raises(ValidationError, match=rf"'{path[-1]}' is a required property"):
        validate(changed(response(), path, drop=True), "Response")


def test_response_null_only_where_allowed():
    for path in (["incomplete_details"], ["instructions"], ["reasoning"], ["output", 2, "caller"]):
        validate(changed(response(), path, None), "Response")
    for path in (["model"], ["output"], ["output", 1, "content", 0, "text"], ["usage"], ["output", 0, "summary"]):
        with pytest.raises(ValidationError, match="None is not"):
            validate(changed(response(), path, None), "Response")


def test_output_text_delta_passes_and_needs_sequence_number():
    validate(text_delta(), "ResponseStreamEvent")
    validate(text_delta(), "ResponseTextDeltaEvent")
    with pytest.raises(ValidationError, match=r"^\$: 'sequence_number' is a required property"):
        validate(changed(text_delta(), ["sequence_number"], drop=True), "ResponseStreamEvent")
    with pytest.raises(ValidationError, match=r"no anyOf branch allows {'type': 'response\.output_text\.deltas'}"):
        validate(changed(text_delta(), ["type"], "response.output_text.deltas"), "ResponseStreamEvent")


def test_stream_events_carrying_a_response_or_an_item():
    for event in ({"type": "response.created", "sequence_number": 0, "response": response()},
                  {"type": "response.output_item.done", "sequence_number": 9, "output_index": 1,
                   "item": message_item()}):
        validate(event, "ResponseStreamEvent")
    with pytest.raises(ValidationError, match=r"^\$\.item\.status: 'done' is not one of"):
        validate({"type": "response.output_item.done", "sequence_number": 9, "output_index": 1,
                  "item": changed(message_item(), ["status"], "done")}, "ResponseStreamEvent")


def test_input_items_list():
    items = {"object": "list", "first_id": "msg_0", "last_id": "msg_0", "has_more": False,
             "data": [{"type": "message", "id": "msg_0", "role": "user", "status": "completed",
                       "content": [{"type": "input_text", "text": "Hi"}]}]}
    validate(items, "ResponseItemList")
    with pytest.raises(ValidationError, match=r"^\$\.data\[0\]: 'id' is a required property"):
        validate(changed(items, ["data", 0, "id"], drop=True), "ResponseItemList")


def test_error_and_models():
    validate({"error": {"message": "bad", "type": "invalid_request_error", "param": "model", "code": None}},
             "ErrorResponse")
    with pytest.raises(ValidationError, match=r"^\$\.error: 'param' is a required property"):
        validate({"error": {"message": "bad", "type": "invalid_request_error", "code": None}}, "ErrorResponse")
    model = {"id": "tiny", "object": "model", "created": 1700000000, "owned_by": "kvserve"}
    validate({"object": "list", "data": [model]}, "ListModelsResponse")
    with pytest.raises(ValidationError, match="'owned_by' is a required property"):
        validate(changed(model, ["owned_by"], drop=True), "Model")


def test_input_item_oneof_overlap_is_the_spec_s():
    # See openai_schema's docstring: this correct input message matches two InputItem branches, so oneOf fails.
    message = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}
    validate(message, "EasyInputMessage")
    validate(message, "InputMessage")
    with pytest.raises(ValidationError, match="is valid under each of"):
        validate(message, "InputItem")


def bodies():
    """(component, body) pairs, correct and broken, for comparing the pruned validator with plain jsonschema."""
    good = [("Response", response()), ("ResponseStreamEvent", text_delta()),
            ("InputItem", {"type": "message", "role": "user", "content": "Hi"}),
            ("ResponseStreamEvent", {"type": "response.output_item.added", "sequence_number": 1,
                                     "output_index": 0, "item": message_item()})]
    broken = [changed(response(), ["output", 1, "type"], "messages"), changed(response(), ["output", 2, "id"], 7),
              changed(response(), ["tool_choice"], {"type": "function"}), changed(response(), ["output", 0], {}),
              changed(response(), ["output", 1, "content", 0, "type"], "refusal")]
    return good + [("Response", body) for body in broken] + [
        ("ResponseStreamEvent", changed(text_delta(), ["type"], 3)), ("ResponseStreamEvent", {"type": "error"}),
        ("ResponseStreamEvent", {"type": {"unhashable": True}}),
        ("InputItem", {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]})]


@pytest.mark.parametrize(("name", "body"), bodies())
def test_pruning_keeps_jsonschema_s_verdict(name, body):
    assert validator(name).is_valid(body) == validator(name, plain=True).is_valid(body)


def vendored():
    return json.loads(FILE.read_text())


def test_vendored_file_is_closed_and_undocumented():
    data = vendored()
    assert "MIT" in data["source"]
    text = json.dumps(data["schemas"])
    for ref in set(text.split('"$ref": "#/components/schemas/')[1:]):
        assert ref.split('"')[0] in data["schemas"]
    for key in ('"x-', '"title": "', '"description": "', '"example"', '"$recursiveRef"'):
        assert key not in text
    # A property named like a stripped keyword stays.
    assert "description" in data["schemas"]["FunctionTool"]["properties"]
    assert "title" in data["schemas"]["ChatCompletionResponseMessage"]["properties"]["annotations"]["items"][
        "properties"]["url_citation"]["properties"]
    assert data["schemas"]["CreateChatCompletionStreamResponse"]["properties"]["usage"]["nullable"] is True
