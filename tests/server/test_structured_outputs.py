"""Structured outputs over HTTP, as the official openai SDK sends them: response_format
(json_schema through the SDK's parse(), json_object), vLLM's structured_outputs and guided_*
extras, streamed and not; a schema that cannot be compiled is a 400 naming its field."""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.launch import launch, stop

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                           "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
          "required": ["city", "population"], "additionalProperties": False}


class City(BaseModel):
    city: str = Field(max_length=20)
    population: int = Field(ge=0, le=99999999)


@pytest.fixture(scope="module")
def client(smollm2_dir, smollm2_tokenizer, tmp_path_factory):
    # SmolLM2's own template, given explicitly: served in place of the shipped one that shows tools
    own = tmp_path_factory.mktemp("template") / "own.jinja"
    own.write_text(smollm2_tokenizer.chat_template)
    proc, base = launch(smollm2_dir, "--chat-template", str(own))
    yield openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    stop(proc)


def _chat(**kw) -> dict:
    return dict(model="smol", messages=[{"role": "user", "content": "Name a big city and its population, as JSON."}],
                max_tokens=80, temperature=0, **kw)


def test_the_sdks_parse_returns_the_pydantic_object(client):
    out = client.chat.completions.parse(**_chat(response_format=City))
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)
    assert City.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_schema_streamed_with_n2_and_a_seed(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    kw = _chat(response_format=fmt, n=2, seed=11)
    kw["temperature"] = 1.0
    texts = ["", ""]
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    whole = client.chat.completions.create(**kw)  # the same seed, not streamed: the same answers
    assert [c.message.content for c in whole.choices] == texts


def test_json_object_on_completions(client):
    out = client.completions.create(model="smol", prompt="A JSON object describing a cat:", max_tokens=64,
                                    temperature=0, extra_body={"response_format": {"type": "json_object"}})
    c = out.choices[0]
    assert c.finish_reason == "length" or isinstance(json.loads(c.text), dict)


@pytest.mark.parametrize("extra,check", [
    ({"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{4}"}}, lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t)),
    ({"guided_regex": r"[0-9]{3}-[0-9]{4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t)),
    ({"structured_outputs": {"choice": ["red", "green"]}}, lambda t: t in ("red", "green")),
    ({"guided_choice": ["red", "green"]}, lambda t: t in ("red", "green")),
    ({"guided_json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    ({"guided_grammar": 'root ::= "It is " ("day" | "night") "."'}, lambda t: t in ("It is day.", "It is night.")),
    ({"structured_outputs": {"structural_tag": {"type": "structural_tag", "format": {"type": "sequence", "elements": [
        {"type": "const_string", "value": "Code: "}, {"type": "regex", "pattern": "[0-9]{4}"}]}}}},
     lambda t: re.fullmatch(r"Code: [0-9]{4}", t)),
])
def test_vllm_extras(client, extra, check):
    out = client.completions.create(model="smol", prompt="Answer:", max_tokens=40, temperature=0, extra_body=extra)
    assert out.choices[0].finish_reason == "stop" and check(out.choices[0].text), out.choices[0].text


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"guided_regex": "("}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"response_format": {"type": "json_object"}, "min_tokens": 2}, "min_tokens"),
    ({"response_format": {"type": "text", "json_schema": {"name": "x", "schema": SCHEMA}}},  # not silently ignored
     "response_format.json_schema"),
])
def test_bad_specs_are_400_naming_the_field(client, body, param):
    r = httpx.post(f"{client.base_url}completions", json={"model": "smol", "prompt": "x", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_without_a_tool_call_format_tools_are_a_400_naming_them(client):
    """This server runs SmolLM2's own template (named by --chat-template), which shows no tool-call
    format: calls cannot be read from its output, so a request that lets the model call is refused;
    "none" is served."""
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    body = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "tools": tools, "max_tokens": 4}
    r = httpx.post(f"{client.base_url}chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    assert "--tool-call-parser" in r.json()["error"]["message"]
    r = httpx.post(f"{client.base_url}chat/completions", json={**body, "tool_choice": "none"})
    assert r.status_code == 200 and "tool_calls" not in r.json()["choices"][0]["message"]
