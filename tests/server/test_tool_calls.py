"""Tool-call parsers on outputs in each family's format (whole, and streamed in every split), the
grammar each format holds a model to (through the engine's own grammar compiler), and the chat
template shipped for SmolLM2."""
from __future__ import annotations

import json
import random

import pytest

from engine.core.sampling_params import StructuredOutputs
from engine.runner.grammar import Grammars
from server.tool_calls import FORMATS, ToolCallStream, detect, finish_reason
from tests.server.launch import ROOT

TEMPLATE = f"{ROOT}/server/chat_templates/smollm2_tool_use.jinja"
WEATHER = {"name": "get_weather", "description": "The weather in a city now",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                           "unit": {"enum": ["celsius", "fahrenheit"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}
TIME = {"name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                       "required": ["zone"], "additionalProperties": False}}

# (format, output text as the family writes it, content expected, [(name, arguments)] expected)
CASES = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     None, [("get_weather", '{"city": "Paris", "unit": "celsius"}')]),
    ("hermes", "I'll check both.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}\n"
               "</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"zone\": \"Europe/Zurich\"}}\n"
               "</tool_call>",
     "I'll check both.", [("get_weather", '{"city": "Zürich"}'), ("get_time", '{"zone": "Europe/Zurich"}')]),
    ("hermes", "The capital of France is Paris.\n", "The capital of France is Paris.\n", []),
    ("hermes", '<tool_call>\n{"name": "run", "arguments": {"code": "print(\\"}{\\")", "n": [1, {"a": []}]}}\n'
               '</tool_call>\nDone.',
     "Done.", [("run", '{"code": "print(\\"}{\\")", "n": [1, {"a": []}]}')]),
    ("hermes", '<tool_call>\n{"arguments": {"q": "cats"}, "name": "search"}\n</tool_call>', None,
     [("search", '{"q": "cats"}')]),
    ("hermes", "Use <tool_call>not json</tool_call> here.", "Use <tool_call>not json</tool_call> here.", []),
    ("hermes", "a < b and <tool_ call", "a < b and <tool_ call", []),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', None,
     [("get_weather", '{"city": "Par')]),  # cut by max_tokens
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None,
     [("get_weather", '{"city": "Paris", "unit": "celsius"}')]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", "parameters": '
                    '{"zone": "CET"}}', None, [("get_weather", '{"city": "Oslo"}'), ("get_time", '{"zone": "CET"}')]),
    ("llama3_json", "2 + 2 = 4 {yes}", "2 + 2 = 4 {yes}", []),
    ("llama3_json", '{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', []),  # JSON, not a call
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", '
                '"arguments": {"zone": "CET"}}]', None,
     [("get_weather", '{"city": "Paris"}'), ("get_time", '{"zone": "CET"}')]),
    ("mistral", 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"zone": "CET"}',
     "Sure.", [("get_weather", '{"city": "Paris"}'), ("get_time", '{"zone": "CET"}')]),
    ("mistral", "No tools [needed] here.", "No tools [needed] here.", []),
]


def _whole(fmt: str, text: str) -> tuple[str | None, list[tuple[str, str]], ToolCallStream]:
    stream = ToolCallStream(FORMATS[fmt])
    content, _ = stream.feed(text, final=True)
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in stream.tool_calls()]
    return (content or None) if calls else content, calls, stream


def _streamed(fmt: str, pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """What a client assembles from the deltas (as the openai SDK does), checking each call's
    first delta carries its id, type and name, and later ones only argument pieces."""
    stream = ToolCallStream(FORMATS[fmt])
    content, calls = "", {}
    for i, piece in enumerate(pieces):
        text, deltas = stream.feed(piece, final=i == len(pieces) - 1)
        content += text
        for d in deltas:
            if d["index"] not in calls:
                assert d["index"] == len(calls) and d["type"] == "function" and d["id"]
                calls[d["index"]] = [d["function"]["name"], d["function"]["arguments"]]
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                calls[d["index"]][1] += d["function"]["arguments"]
    return content, [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_parser_reads_whole_outputs(fmt, text, content, calls):
    got_content, got_calls, stream = _whole(fmt, text)
    assert (got_content, got_calls) == (content, calls)
    assert finish_reason("stop", stream) == ("tool_calls" if calls else "stop")
    assert finish_reason("length", stream) == "length"
    assert len({c["id"] for c in stream.tool_calls()}) == len(calls)


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_streamed_pieces_add_up_to_the_whole_answer(fmt, text, content, calls, smollm2_tokenizer):
    ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
    tokens = [smollm2_tokenizer.decode(ids[:i + 1])[len(smollm2_tokenizer.decode(ids[:i])):] for i in range(len(ids))]
    rng = random.Random(0)
    cuts = [sorted(rng.sample(range(1, len(text)), min(len(text) - 1, k))) for k in (1, 3, 7)]
    splits = [list(text), tokens] + [[text[a:b] for a, b in zip([0, *c], [*c, len(text)])] for c in cuts]
    for pieces in splits:
        assert "".join(pieces) == text
        assert _streamed(fmt, pieces) == (content or "", calls), pieces


def test_mistral_ids_are_nine_letters_and_digits():
    (_, _, stream) = _whole("mistral", CASES[-3][1])
    assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in stream.tool_calls())


@pytest.fixture(scope="module")
def grammars(smollm2_tokenizer):
    return Grammars(smollm2_tokenizer, 49152, {2})


def _accepts(grammars, tokenizer, tag: dict, text: str) -> bool:
    """Whether the structural tag's grammar takes `text` and then the end of the output."""
    matcher = grammars.matcher(StructuredOutputs(structural_tag=tag))
    return all(matcher.accept_token(t) for t in tokenizer.encode(text, add_special_tokens=False)) \
        and matcher.accept_token(2)


def _call_text(fmt: str, name: str, args: str) -> str:
    f = FORMATS[fmt]
    tag = f.tag(WEATHER if name == "get_weather" else TIME)
    return tag["begin"] + args + tag["end"]


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "mistral"])
def test_each_format_grammar_takes_its_calls_and_refuses_others(fmt, grammars, smollm2_tokenizer):
    f = FORMATS[fmt]
    good_w, good_t = '{"city": "Oslo", "unit": "celsius"}', '{"zone": "CET"}'
    one = _call_text(fmt, "get_weather", good_w)
    two = one + f.separator + _call_text(fmt, "get_time", good_t)
    if fmt == "mistral":
        one, two = f"[TOOL_CALLS][{one}]", f"[TOOL_CALLS][{two}]"
    required = f.grammar([WEATHER, TIME], "required", parallel=True)
    assert _accepts(grammars, smollm2_tokenizer, required, one)
    assert _accepts(grammars, smollm2_tokenizer, required, two)
    assert not _accepts(grammars, smollm2_tokenizer, required, one.replace("celsius", "kelvin"))  # not in the enum
    assert not _accepts(grammars, smollm2_tokenizer, required, "Hello")  # calls only
    single = f.grammar([WEATHER, TIME], "required", parallel=False)
    assert _accepts(grammars, smollm2_tokenizer, single, one)
    assert not _accepts(grammars, smollm2_tokenizer, single, two)
    named = f.grammar([TIME], "get_time", parallel=True)
    assert not _accepts(grammars, smollm2_tokenizer, named, one)
    # what the grammar takes, the format's parser reads back
    assert _whole(fmt, two)[1] == [("get_weather", good_w), ("get_time", good_t)]


@pytest.mark.parametrize("fmt", ["hermes", "mistral"])
def test_auto_takes_text_and_holds_any_call_to_its_schema(fmt, grammars, smollm2_tokenizer):
    f = FORMATS[fmt]
    auto = f.grammar([WEATHER, TIME], "auto", parallel=True)
    call = _call_text(fmt, "get_time", '{"zone": "CET"}')
    if fmt == "mistral":
        call = f"[TOOL_CALLS][{call}]"
    assert _accepts(grammars, smollm2_tokenizer, auto, "Just words, no call.")
    assert _accepts(grammars, smollm2_tokenizer, auto, "Let me look. " + call)
    assert not _accepts(grammars, smollm2_tokenizer, auto, "Let me look. " + call.replace('"CET"', "12"))


def test_detect_reads_the_format_a_template_shows(smollm2_tokenizer):
    with open(TEMPLATE) as f:
        assert detect(f.read()) == "hermes"
    assert detect(smollm2_tokenizer.chat_template) is None  # SmolLM2's own template shows no tools
    assert detect("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect("{{ '<|python_tag|>' }}") == "llama3_json"
    assert detect("{{ '<tool_call>' + '[TOOL_CALLS]' }}") is None  # two fit: not unambiguous


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_shipped_template_without_tools_renders_as_the_models_own(smollm2_tokenizer, messages, generation_prompt):
    with open(TEMPLATE) as f:
        template = f.read()
    own = smollm2_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    shipped = smollm2_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                    chat_template=template)
    assert shipped == own


def test_shipped_template_shows_tools_calls_and_results_in_the_parsers_format(smollm2_tokenizer):
    with open(TEMPLATE) as f:
        template = f.read()
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Rome?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "21 C"},
                {"role": "tool", "tool_call_id": "c2", "content": "clear"}]
    text = smollm2_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                 chat_template=template, tools=[{"type": "function", "function": TIME}])
    assert text.startswith("<|im_start|>system\nBe brief.\n\n")
    assert json.dumps(TIME) in text  # the signature, as JSON
    assert text.count("<|im_start|>system") == 1
    # the earlier call reads back through the parser as the call it was
    start = text.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    turn = text[start:text.index("<|im_end|>", start)]
    assert _whole("hermes", turn)[1] == [("get_weather", '{"city": "Rome"}')]
    assert "<|im_start|>user\n<tool_response>\n21 C\n</tool_response>\n<tool_response>\nclear\n</tool_response>" \
           "<|im_end|>\n<|im_start|>assistant\n" in text
