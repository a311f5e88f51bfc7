"""Reasoning parsers: outputs in the shapes Qwen3 and DeepSeek-R1 write them, whole and streamed
piece by piece (token pieces and single characters); and over HTTP, a server with
`--reasoning-parser qwen3` and a template that, like Qwen3's, closes an empty thinking segment in
the prompt when `chat_template_kwargs.enable_thinking` is false."""
from __future__ import annotations

import json
import random

import anthropic
import httpx
import openai
import pytest

from server.reasoning import FORMATS, ReasoningStream
from tests.server.launch import launch, stop

# (parser, output, thinking on, expected (reasoning, content))
RECORDED = [
    # Qwen3 (hybrid, thinking on): the model opens and closes the segment itself
    ("qwen3", "<think>\nThe user asks for 2 + 2. That is 4.\n</think>\n\nThe answer is 4.", True,
     ("\nThe user asks for 2 + 2. That is 4.\n", "\n\nThe answer is 4.")),
    # Qwen3 with /no_think: an empty segment, then the answer
    ("qwen3", "<think>\n\n</think>\n\nHello! How can I help?", True, ("\n\n", "\n\nHello! How can I help?")),
    # Qwen3 thinking models and DeepSeek-R1: the template opened the segment in the prompt
    ("qwen3", "Okay, let me think: 17 is prime.\n</think>\n\nYes, 17 is prime.", True,
     ("Okay, let me think: 17 is prime.\n", "\n\nYes, 17 is prime.")),
    ("deepseek_r1", "Okay, so I need to find x. 2x = 6, x = 3.\n</think>\n\nx = 3", True,
     ("Okay, so I need to find x. 2x = 6, x = 3.\n", "\n\nx = 3")),
    ("deepseek_r1", "<think>\nFirst, 9 * 9 = 81.\n</think>\n\n**81**", True, ("\nFirst, 9 * 9 = 81.\n", "\n\n**81**")),
    # cut off mid-thought (max_tokens): all of it is reasoning
    ("deepseek_r1", "<think>\nLet me list the primes below 100: 2, 3, 5, 7, 11", True,
     ("\nLet me list the primes below 100: 2, 3, 5, 7, 11", "")),
    # enable_thinking false: the prompt closed the segment, the whole output is the answer
    ("qwen3", "Paris is the capital of France.", False, ("", "Paris is the capital of France.")),
    # deepseek_r1 has no switch: a missing end still means the answer was cut off
    ("deepseek_r1", "Paris is the capital of France.", False, ("Paris is the capital of France.", "")),
    # markers that are only text: a tag inside the answer stays there, a lone `<` too
    ("qwen3", "<think>a < b</think>Use <think> tags like this: </think>.", True,
     ("a < b", "Use <think> tags like this: </think>.")),
    ("qwen3", "  <thinking is hard", True, ("  <thinking is hard", "")),
]


def _whole(parser: str, text: str, thinking: bool) -> tuple[str, str]:
    fmt = FORMATS[parser]
    return fmt.split(text, True, fmt.thinks({"enable_thinking": thinking}))


def _streamed(parser: str, pieces: list[str], thinking: bool) -> tuple[str, str]:
    fmt = FORMATS[parser]
    stream = ReasoningStream(fmt, fmt.thinks({"enable_thinking": thinking}))
    reasoning = content = ""
    for i, piece in enumerate(pieces):
        r, c = stream.feed(piece, final=i == len(pieces) - 1)
        assert not (content and r), "reasoning after the content began"
        reasoning, content = reasoning + r, content + c
    return reasoning, content


@pytest.mark.parametrize("parser,text,thinking,want", RECORDED)
def test_whole_and_streamed_outputs_split_alike(smollm2_tokenizer, parser, text, thinking, want):
    assert _whole(parser, text, thinking) == want
    ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
    token_pieces, before = [], ""
    for n in range(1, len(ids) + 1):  # each token's piece of the text, as the detokenizer gives them
        now = smollm2_tokenizer.decode(ids[:n])
        token_pieces.append(now[len(before):])
        before = now
    assert "".join(token_pieces) == text
    rng = random.Random(0)
    cuts = sorted(rng.sample(range(1, len(text)), min(5, len(text) - 1)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    for pieces in (token_pieces, list(text), chunks):
        assert _streamed(parser, pieces, thinking) == want


def test_a_partial_end_tag_is_held_back_until_it_resolves():
    stream = ReasoningStream(FORMATS["qwen3"], True)
    assert stream.feed("<think>step one</thi", final=False) == ("step one", "")
    assert stream.feed("nk>\n\nDone", final=False) == ("", "\n\nDone")
    stream = ReasoningStream(FORMATS["qwen3"], True)
    assert stream.feed("<think>a </", final=False) == ("a ", "")
    assert stream.feed("b", final=True) == ("</b", "")


# --- over HTTP ---------------------------------------------------------------------------------
# SmolLM2's own template, plus Qwen3's switch: thinking off closes an empty segment in the prompt
TEMPLATE = (
    "{%- for message in messages %}{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{%- endif %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")
ASK = [{"role": "user", "content": "What is the capital of France?"}]
OFF = {"chat_template_kwargs": {"enable_thinking": False}}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
          "additionalProperties": False}


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "qwen3_style.jinja"
    path.write_text(TEMPLATE)
    proc, base = launch(smollm2_dir, "--chat-template", str(path), "--reasoning-parser", "qwen3")
    yield base, openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    stop(proc)


def _post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url, json=body, timeout=60)


def _plain(base: str, kwargs: dict | None, **fields) -> str:
    """What the model writes after the templated prompt, read through /v1/completions (no parser)."""
    body = {"messages": ASK, **({"chat_template_kwargs": kwargs} if kwargs else {})}
    ids = _post(f"{base}/tokenize", body).json()["tokens"]
    out = _post(f"{base}/v1/completions", {"prompt": ids, "max_tokens": 24, "temperature": 0, **fields})
    return out.json()["choices"][0]["text"]


def test_chat_template_kwargs_reach_the_template(server):
    base, _ = server
    on = _post(f"{base}/tokenize", {"messages": ASK}).json()["tokens"]
    off = _post(f"{base}/tokenize", {"messages": ASK, **OFF}).json()["tokens"]
    tail = _post(f"{base}/detokenize", {"tokens": off[len(on):]}).json()["prompt"]
    assert off[:len(on)] == on and tail == "<think>\n\n</think>\n\n"


def test_thinking_on_without_an_end_is_all_reasoning(server):
    base, client = server
    out = client.chat.completions.create(model="smol", messages=ASK, max_tokens=24, temperature=0)
    message = out.choices[0].message
    plain = _plain(base, None)
    assert message.model_extra["reasoning_content"] == plain and message.content is None


def test_thinking_off_is_all_content_and_streams_alike(server):
    base, client = server
    out = client.chat.completions.create(model="smol", messages=ASK, max_tokens=24, temperature=0, extra_body=OFF)
    message = out.choices[0].message
    assert message.content == _plain(base, {"enable_thinking": False}) and message.content
    assert message.model_extra["reasoning_content"] is None
    chunks = list(client.chat.completions.create(model="smol", messages=ASK, max_tokens=24, temperature=0,
                                                 stream=True, extra_body=OFF))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == message.content
    assert not any((c.choices[0].delta.model_extra or {}).get("reasoning_content") for c in chunks if c.choices)


def test_streamed_reasoning_adds_up_to_the_whole(server):
    _, client = server
    whole = client.chat.completions.create(model="smol", messages=ASK, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model="smol", messages=ASK, max_tokens=24, temperature=0,
                                                 stream=True))
    streamed = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                       for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.model_extra["reasoning_content"]
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


def test_a_schema_holds_the_answer_not_the_thinking(server):
    base, client = server
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    # thinking on: the model never closes its thinking, so the schema never starts
    thinking = client.chat.completions.create(model="smol", messages=ASK, max_tokens=24, temperature=0,
                                              response_format=fmt)
    assert thinking.choices[0].message.model_extra["reasoning_content"] == _plain(base, None)
    # thinking off: the answer follows the schema from its first token
    answer = client.chat.completions.create(model="smol", messages=ASK, max_tokens=24, temperature=0,
                                            response_format=fmt, extra_body=OFF)
    assert set(json.loads(answer.choices[0].message.content)) == {"city"}


@pytest.mark.parametrize("kwargs,param", [({"tools": []}, "chat_template_kwargs.tools"),
                                          ({"add_generation_prompt": False},
                                           "chat_template_kwargs.add_generation_prompt"),
                                          ({"bad key": 1}, "chat_template_kwargs.bad key"),
                                          ("yes", "chat_template_kwargs")])
def test_bad_chat_template_kwargs_are_400_naming_them(server, kwargs, param):
    base, _ = server
    r = _post(f"{base}/v1/chat/completions", {"messages": ASK, "chat_template_kwargs": kwargs})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# --- the same split through Responses and Messages ---------------------------------------------
def test_responses_put_the_thinking_in_a_reasoning_item(server):
    from tests.server.openai_schema import validate

    base, client = server
    out = client.responses.create(model="smol", input=ASK, max_output_tokens=24, temperature=0)
    [item] = out.output
    assert item.type == "reasoning" and item.content[0].text == _plain(base, None)
    assert out.usage.output_tokens_details.reasoning_tokens == out.usage.output_tokens > 0  # never closed
    body = {"input": ASK, "max_output_tokens": 24, "temperature": 0, "stream": True}
    events = []
    with httpx.stream("POST", f"{base}/v1/responses", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    for event in events:
        validate(event, "ResponseStreamEvent")
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert deltas == item.content[0].text
    off = client.responses.create(model="smol", input=ASK, max_output_tokens=24, temperature=0, extra_body=OFF)
    assert [i.type for i in off.output] == ["message"] and off.output_text == _plain(base, {"enable_thinking": False})
    assert off.usage.output_tokens_details.reasoning_tokens == 0


def test_messages_put_the_thinking_in_a_thinking_block(server):
    base, _ = server
    claude = anthropic.Anthropic(base_url=base, api_key="none", max_retries=0)
    kw = dict(model="smol", max_tokens=24, messages=ASK, extra_body={"temperature": 0})
    thinking = claude.messages.create(**kw)
    assert [b.type for b in thinking.content] == ["thinking"] and thinking.content[0].thinking == _plain(base, None)
    with claude.messages.stream(**kw) as stream:
        assert stream.get_final_message().content == thinking.content
    off = claude.messages.create(**kw, thinking={"type": "disabled"})
    assert [b.type for b in off.content] == ["text"] and off.content[0].text == _plain(base, {"enable_thinking": False})
