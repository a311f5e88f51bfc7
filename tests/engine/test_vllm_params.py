"""vLLM's sampling extras on SmolLM2, offline: each changes the output as vLLM documents, checked
against transformers (with the same rule applied by hand) or against the request without it."""
import pytest
import torch

from engine import LLM, SamplingParams
from tests.conftest import hf_greedy

GREEDY = dict(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return LLM(str(smollm2_dir), max_model_len=1024)


@pytest.fixture(scope="module")
def prompt(reference_prompts):
    return next(p for p in reference_prompts if 24 <= len(p) <= 64)


def _greedy_masked(hf, prompt: list[int], steps: int, ban) -> list[int]:
    """transformers' greedy decoding with ban(output so far) -> token ids masked at each step."""
    def mask(input_ids, scores):  # [1, T], [1, V]
        scores[0, list(ban(input_ids[0, len(prompt):].tolist()))] = float("-inf")
        return scores

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                          do_sample=False, logits_processor=[mask], pad_token_id=hf.generation_config.eos_token_id)
    return out[0, len(prompt):].tolist()


def _one(llm, prompt, **kw):
    return llm.generate([prompt], SamplingParams(**{**GREEDY, **kw}))[0].outputs[0]


def test_include_stop_str_in_output_keeps_the_stop_string(llm, prompt):
    base = _one(llm, prompt)
    stop = base.text[5:9]
    cut = _one(llm, prompt, stop=[stop])
    kept = _one(llm, prompt, stop=[stop], include_stop_str_in_output=True)
    assert cut.text == base.text[:base.text.index(stop)] and cut.stop_reason == stop
    assert kept.text == cut.text + stop and kept.token_ids == cut.token_ids


def test_truncate_prompt_tokens_equals_the_prompt_cut_by_hand(llm, prompt):
    assert len(prompt) > 12
    cut = _one(llm, prompt, truncate_prompt_tokens=12)
    by_hand = llm.generate([prompt[-12:]], SamplingParams(**GREEDY))[0]
    assert cut.token_ids == by_hand.outputs[0].token_ids
    whole = llm.generate([prompt], SamplingParams(**GREEDY, truncate_prompt_tokens=-1))[0]
    assert whole.prompt_token_ids == prompt  # -1: up to the context length, which this prompt is within


def test_allowed_token_ids_restrict_every_token(llm, prompt, hf_smollm2):
    base = _one(llm, prompt)
    allowed = sorted(set(base.token_ids[::2]) | {11, 198, 253})
    out = _one(llm, prompt, allowed_token_ids=allowed)
    assert set(out.token_ids) <= set(allowed)
    others = [t for t in range(hf_smollm2.config.vocab_size) if t not in set(allowed)]
    assert out.token_ids == _greedy_masked(hf_smollm2, prompt, GREEDY["max_tokens"], lambda _: others)


def test_bad_words_never_appear_and_the_rest_is_greedy(llm, prompt, hf_smollm2, smollm2_tokenizer):
    base = _one(llm, prompt)
    words = base.text.split()
    bad = [words[1], " ".join(words[3:5])]  # one word, and two (several tokens)
    seqs = []
    for w in bad:  # vLLM's rule: the word, and after a space if as many tokens and another first one
        alone, spaced = (smollm2_tokenizer.encode(t, add_special_tokens=False) for t in (w, " " + w))
        seqs += [alone] + ([spaced] if len(spaced) == len(alone) and spaced[0] != alone[0] else [])
    assert any(len(s) > 1 for s in seqs)

    def ban(out):
        return [s[-1] for s in seqs
                if len(s) == 1 or (len(out) >= len(s) - 1 and out[len(out) - len(s) + 1:] == s[:-1])]

    out = _one(llm, prompt, bad_words=bad)
    assert out.token_ids == _greedy_masked(hf_smollm2, prompt, GREEDY["max_tokens"], ban)
    assert out.token_ids != base.token_ids
    for s in seqs:
        assert not any(out.token_ids[i:i + len(s)] == s for i in range(len(out.token_ids)))


def test_spaces_between_special_tokens(llm, smollm2_tokenizer):
    im_end = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = smollm2_tokenizer.encode("Say hi.")
    allowed = [im_end, *smollm2_tokenizer.encode(" hi", add_special_tokens=False)]
    kw = dict(allowed_token_ids=allowed, skip_special_tokens=False, max_tokens=4, temperature=0.0, ignore_eos=True,
              stop_token_ids=[], seed=0)
    plain = _one(llm, prompt, **kw).text  # as the tokenizer decodes
    spaced = _one(llm, prompt, **kw, spaces_between_special_tokens=True).text
    tight = _one(llm, prompt, **kw, spaces_between_special_tokens=False).text
    assert "<|im_end|>" in plain and plain == tight
    # a space around each special token, also after the prompt's text ("Say hi.") before the first
    assert spaced == " " + " ".join(p for p in plain.replace("<|im_end|>", "\0<|im_end|>\0").split("\0") if p)


@pytest.mark.parametrize("field,value", [("allowed_token_ids", [1 << 20]), ("allowed_token_ids", []),
                                         ("bad_words", ["  "]), ("truncate_prompt_tokens", 0)])
def test_bad_values_name_the_field(llm, prompt, field, value):
    with pytest.raises(ValueError, match=field):
        llm.generate([prompt], SamplingParams(**{field: value}))


def test_extras_leave_the_pool_empty(llm):
    llm.engine.check_invariants()
    assert llm.engine.kv.pool.num_free == llm.engine.num_kv_blocks


def test_greedy_reference_agrees_with_transformers(llm, prompt, hf_smollm2):
    """The hand-written masked decoding above, with nothing masked, is transformers' greedy."""
    assert _greedy_masked(hf_smollm2, prompt, 8, lambda _: []) == hf_greedy(hf_smollm2, prompt, 8)


def test_add_special_tokens_off_leaves_a_text_prompt_bare(llm, smollm2_dir):
    """(SmolLM2's tokenizer adds nothing; one made to add a BOS shows the switch)"""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir, add_bos_token=True, bos_token="<|endoftext|>")
    params = SamplingParams(max_tokens=1)
    bare = llm.engine.prepare_prompt("Hello there", params, tok, add_special_tokens=False)
    assert llm.engine.prepare_prompt("Hello there", params, tok) == [tok.bos_token_id, *bare]


def test_priority_is_not_starved_and_the_rest_still_finish(smollm2_dir, prompt):
    """Two seats, four low-priority requests queued and running; a high-priority one arriving
    later gets its first token on its first step (as if alone), and every low one still finishes
    with the tokens it would have had alone (preempted ones are recomputed)."""
    from engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), max_num_seqs=2, scheduling_policy="priority"))
    params = SamplingParams(**{**GREEDY, "max_tokens": 6})
    for i in range(4):
        engine.add_request(f"low{i}", prompt, params, priority=5)
    engine.step()
    engine.add_request("high", prompt[:-3], params, priority=-1)
    first = [o for o in engine.step() if o.request_id == "high"]
    assert first and len(first[0].outputs[0].token_ids) == 1
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    assert len({tuple(done[f"low{i}"]) for i in range(4)}) == 1 and len(done) == 5
    assert engine.scheduler.num_preemptions >= 1
    with pytest.raises(ValueError, match="priority"):
        LLMEngine.check_priority(engine, 1 << 63)
    engine.close()


def test_fcfs_refuses_a_priority_naming_the_flag(llm, prompt):
    with pytest.raises(ValueError, match="--scheduling-policy priority"):
        llm.generate([prompt], SamplingParams(max_tokens=1), priority=[1])
