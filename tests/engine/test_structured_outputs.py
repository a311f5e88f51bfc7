"""Structured outputs: the grammar stage of the sampler against a direct computation, and
generated outputs that follow their schemas (greedy, seeded, n > 1, batched, preempted)."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from engine import LLM, SamplingParams
from engine.core.config import EngineConfig
from engine.core.sampling_params import StructuredOutputs
from engine.frontend.llm_engine import LLMEngine
from engine.runner.grammar import Grammars, fill_bitmask
from engine.runner.sampler import Sampler
from tests.engine.test_sampler import metadata

# Every string, number and array is bounded, so that each grammar ends within max_tokens.
NAME = {"type": "string", "maxLength": 16}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer", "minimum": -999, "maximum": 999},
                                                          {"type": "string", "maxLength": 5}]}},
     "required": ["v"], "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}},
     "required": ["id"], "additionalProperties": False},
    {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                                             "minItems": 2, "maxItems": 4}},
     "required": ["xs"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"name": NAME, "admin": {
        "type": "boolean"}}, "required": ["name", "admin"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
     "required": ["user", "tags"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 10}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string", "null"],
                                                                         "maxLength": 12}},
     "required": ["ok", "note"], "additionalProperties": False},
]
PROMPT = "Answer with JSON only. Describe a famous scientist:"


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return LLM(str(smollm2_dir))


def test_the_grammar_stage_masks_exactly_the_tokens_the_grammar_refuses(smollm2_tokenizer):
    vocab = 49152
    grammars = Grammars(smollm2_tokenizer, vocab, {2})
    spec = StructuredOutputs(regex="(cat|dog)s? [0-9]+")
    matcher = grammars.matcher(spec)
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(0)) * 3
    bitmask = fill_bitmask([matcher], [0], 2, vocab)  # row 1 has no grammar
    bits = ((bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).reshape(2, -1)[:, :vocab].bool()
    assert bits[1].all()
    allowed = bits[0].nonzero()[:, 0].tolist()
    assert 0 < len(allowed) < 1000
    for t in allowed:  # each token the mask lets through is one a fresh matcher accepts...
        assert grammars.matcher(spec).accept_token(t), t
    refused = [t for t in range(0, vocab, 37) if not bits[0, t]]
    for t in refused:  # ...and the others it refuses (every 37th token checked)
        assert not grammars.matcher(spec).accept_token(t), t
    md = metadata(2, temperature=torch.zeros(2), grammar_bitmask=bitmask)
    tokens, _ = Sampler(torch.Generator())(logits, md)
    want = logits[0].masked_fill(~bits[0], float("-inf")).argmax().item()
    assert tokens == [want, logits[1].argmax().item()]


def _check(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


def test_outputs_follow_their_schemas_greedy_and_seeded_with_n2(llm):
    params = [SamplingParams(temperature=0.0, max_tokens=160, structured_outputs=StructuredOutputs(json=s))
              for s in SCHEMAS]
    params += [SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=160, structured_outputs=StructuredOutputs(
        json=s)) for s in SCHEMAS]
    outs = llm.generate([PROMPT] * len(params), params)
    for i, out in enumerate(outs):
        for c in out.outputs:
            assert c.finish_reason == "stop", (i, c.text)
            _check(c.text, SCHEMAS[i % len(SCHEMAS)])
    again = llm.generate([PROMPT] * len(SCHEMAS), params[len(SCHEMAS):])  # the same seeds, another batch
    assert [[c.text for c in o.outputs] for o in again] == [[c.text for c in o.outputs] for o in outs[len(SCHEMAS):]]


def test_regex_choice_grammar_and_json_object(llm):
    specs = [StructuredOutputs(regex=r"\(\d{3}\) \d{3}-\d{4}"), StructuredOutputs(choice=["yes", "no", "maybe"]),
             StructuredOutputs(grammar='root ::= "The answer is " [0-9] [0-9]? "."'),
             StructuredOutputs(json_object=True)]
    outs = llm.generate(["Call me at", "Is the sky blue?", "What is 6 times 7?", "Some JSON:"],
                        [SamplingParams(temperature=0.0, max_tokens=64, structured_outputs=s) for s in specs])
    phone, choice, sentence, obj = (o.outputs[0] for o in outs)


    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", phone.text) and phone.finish_reason == "stop"
    assert choice.text in ("yes", "no", "maybe")
    assert re.fullmatch(r"The answer is [0-9][0-9]?\.", sentence.text)
    assert isinstance(json.loads(obj.text), dict) if obj.finish_reason == "stop" else obj.finish_reason == "length"


def test_constrained_and_free_requests_share_a_step_and_survive_preemption(smollm2_dir, llm):
    free = SamplingParams(temperature=0.0, max_tokens=40)
    constrained = [SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=StructuredOutputs(json=s))
                   for s in SCHEMAS[:3]]
    alone = llm.generate(["Tell me about the sea."], free)[0].outputs[0].token_ids
    want = [o.outputs[0].text for o in llm.generate([PROMPT] * 3, constrained)]
    # 6 blocks of 16 tokens cannot hold all four at once: some are preempted and recomputed
    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), num_kv_blocks=6))
    engine.add_request("free", "Tell me about the sea.", free)
    for i, p in enumerate(constrained):
        engine.add_request(str(i), PROMPT, p)
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o.outputs[0]) for o in engine.step() if o.finished)
    assert engine.scheduler.num_preemptions > 0
    assert done["free"].token_ids == alone
    assert [done[str(i)].text for i in range(3)] == want


def test_a_grammar_starts_after_its_marker(llm, smollm2_tokenizer):
    # a reasoning model's "</think>" stands in for a marker the model writes anyway: a piece of its own
    # greedy answer. Up to the marker the output is the free one, token for token; after it, the language.
    free = llm.generate(["Is the sky blue?"], SamplingParams(temperature=0.0, max_tokens=12,
                                                             ignore_eos=True))[0].outputs[0]
    assert len(free.token_ids) == 12
    marker_ids = smollm2_tokenizer.encode(smollm2_tokenizer.decode(free.token_ids[3:5]), add_special_tokens=False)
    assert marker_ids == free.token_ids[3:5]  # (the marker encodes as the model wrote it)
    marker = smollm2_tokenizer.decode(marker_ids)
    assert marker.strip()
    spec = StructuredOutputs(choice=["yes", "no"], start_after=marker)
    out = llm.generate(["Is the sky blue?"], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                            structured_outputs=spec))[0].outputs[0]
    assert out.token_ids[:5] == free.token_ids[:5]
    assert smollm2_tokenizer.decode(out.token_ids[5:], skip_special_tokens=True) in ("yes", "no")
    assert out.finish_reason == "stop"


@pytest.mark.parametrize("spec", [dict(json={"type": "nonsense"}), dict(regex="("), dict(grammar="root ::= "),
                                  dict(json="{not json")])
def test_a_spec_that_does_not_compile_is_a_value_error_naming_its_field(llm, spec):
    with pytest.raises(ValueError, match=r"^guided_x: cannot be compiled"):
        llm.generate(["Hi"], SamplingParams(structured_outputs=StructuredOutputs(**spec, field="guided_x")))


def test_min_tokens_cannot_be_combined_with_a_grammar():
    with pytest.raises(ValueError, match=r"^min_tokens"):
        SamplingParams(min_tokens=3, structured_outputs=StructuredOutputs(regex="a+"))
