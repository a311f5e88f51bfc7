"""End to end: a real uvicorn server on loopback with SmolLM2, the real openai SDK and raw SSE."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from tests.conftest import hf_greedy
from tests.server.launch import launch, metrics, stop, wait_idle
from tests.server.openai_schema import validate


@pytest.fixture(scope="module")
def server(smollm2_dir):
    proc, base = launch(smollm2_dir)
    yield base
    stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def _sse(base: str, path: str, body: dict) -> list:
    """Raw SSE: the list of data payloads, '[DONE]' kept as a string."""
    events = []
    with httpx.stream("POST", f"{base}{path}", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_completion_matches_hf_and_stream_matches_non_stream(server, client, hf_smollm2, smollm2_tokenizer):
    prompt = "The lighthouse keeper climbed the stairs and"
    ref_ids = hf_greedy(hf_smollm2, smollm2_tokenizer.encode(prompt), 24)
    full = client.completions.create(model="smol", prompt=prompt, max_tokens=24, temperature=0)
    assert full.choices[0].text == smollm2_tokenizer.decode(ref_ids, skip_special_tokens=True)
    assert full.usage.completion_tokens == len(ref_ids)
    assert full.usage.prompt_tokens == len(smollm2_tokenizer.encode(prompt))
    events = _sse(server, "/v1/completions", {"prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full.choices[0].text
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("length") == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c or c["usage"] is None for c in chunks)


def test_chat_stream_role_first_and_usage_last(server, client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    full = client.chat.completions.create(model="smol", messages=messages, temperature=0, max_tokens=30)
    assert full.choices[0].message.content == "The capital of France is Paris."
    assert full.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="smol", messages=messages, temperature=0, max_tokens=30,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices].count("stop") == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_batch_prompts_n_seed_and_stop(client):
    out = client.completions.create(model="smol", prompt=["Once upon a time", "The capital of Italy is"],
                                    max_tokens=8, temperature=1.0, n=3, seed=7)
    assert sorted(c.index for c in out.choices) == list(range(6))
    assert len({c.text for c in out.choices if c.index < 3}) == 3
    single = client.completions.create(model="smol", prompt="The capital of Italy is", max_tokens=8, temperature=0)
    pair = client.completions.create(model="smol", prompt=["Once upon a time", "The capital of Italy is"],
                                     max_tokens=8, temperature=0)
    assert [c.index for c in pair.choices] == [0, 1] and pair.choices[1].text == single.choices[0].text
    cut = single.choices[0].text[3:7]
    stopped = client.completions.create(model="smol", prompt="The capital of Italy is", max_tokens=8,
                                        temperature=0, stop=[cut])
    assert stopped.choices[0].text == single.choices[0].text[:single.choices[0].text.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body,status,param,needle", [
    ({"prompt": "x", "temperature": -1}, 400, "temperature", "temperature"),
    ({"prompt": "x", "max_tokens": 9000}, 400, None, "maximum context length is 8192 tokens"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
    ({"prompt": "x", "n": "many"}, 400, "n", "n"),
    ({}, 400, "prompt", "prompt"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),  # 0 only with echo
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs", "logprobs"),
    ({"prompt": "x", "use_beam_search": True, "temperature": 0.7}, 400, "temperature", "use_beam_search"),
    ({"prompt": "x", "use_beam_search": True, "best_of": 2, "n": 3}, 400, "best_of", "best_of"),
    ({"prompt": "x", "use_beam_search": True, "early_stopping": "sometimes"}, 400, "early_stopping",
     "early_stopping"),
    ({"prompt": "x", "length_penalty": 0.5}, 400, "length_penalty", "use_beam_search"),
    ({"prompt": "x", "use_beam_search": True, "best_of": 300}, 400, "best_of", "32"),
])
def test_errors_are_openai_shaped(server, client, body, status, param, needle):
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert needle in err["message"] and err["param"] == param and "type" in err
    assert client.completions.create(model="smol", prompt="Hi", max_tokens=2).choices[0].text  # still serving


def test_malformed_json_is_400(server):
    r = httpx.post(f"{server}/v1/completions", content=b"{bad", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["smol"]
    assert client.models.retrieve("smol").id == "smol"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    validate(httpx.get(f"{server}/v1/models").json(), "ListModelsResponse")
    validate(httpx.get(f"{server}/v1/models/smol").json(), "Model")
    missing = httpx.get(f"{server}/v1/models/org/gpt-4")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    validate(missing.json(), "ErrorResponse")
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


CHAT = {"messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0, "max_tokens": 6}


@pytest.mark.parametrize("path,body,whole,chunk", [
    ("/v1/chat/completions", CHAT, "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 2, "n": 2,
                              "stream_options": {"include_usage": True}},
     "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse"),
    # (not with echo: the prompt's first token has no logprob, null as OpenAI's legacy API sends it; the spec: number)
    ("/v1/completions", {"prompt": "The sky is", "max_tokens": 4, "logprobs": 2},
     "CreateCompletionResponse", None),  # (the spec gives no schema for a completions stream's chunks)
])
def test_bodies_and_chunks_follow_openais_published_schema(server, path, body, whole, chunk):
    stream_body = {**body, "stream": True}
    if "stream_options" in body:
        body = {k: v for k, v in body.items() if k != "stream_options"}
    r = httpx.post(f"{server}{path}", json=body, timeout=60)
    assert r.status_code == 200
    validate(r.json(), whole)
    events = _sse(server, path, stream_body)
    assert events[-1] == "[DONE]"
    for event in events[:-1] if chunk is not None else ():
        validate(event, chunk)
    bad = httpx.post(f"{server}{path}", json={**body, "temperature": 7})
    assert bad.status_code == 400
    validate(bad.json(), "ErrorResponse")


def test_tokenize_and_detokenize_round_trip(server, client, smollm2_tokenizer):
    text = "Hello, world! 🚀 東京"
    r = httpx.post(f"{server}/tokenize", json={"prompt": text}).json()
    assert r["tokens"] == smollm2_tokenizer.encode(text) and r["count"] == len(r["tokens"])
    assert httpx.post(f"{server}/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = httpx.post(f"{server}/tokenize", json={"messages": messages}).json()
    full = client.chat.completions.create(model="smol", messages=messages, max_tokens=1)
    assert chat["count"] == full.usage.prompt_tokens
    bad = httpx.post(f"{server}/detokenize", json={"tokens": [10 ** 9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def _busy(server) -> bool:
    m = metrics(server)
    return m["kvserve:num_requests_running"] > 0 and m["kvserve:kv_cache_usage_perc"] > 0


def test_disconnect_mid_stream_frees_the_request(server):
    body = {"prompt": "Tell me a very long story.", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
        assert got and _busy(server)
    wait_idle(server)


def test_disconnect_while_waiting_for_a_non_streamed_answer_frees_it(server):
    body = {"prompt": "Tell me a very long story.", "max_tokens": 4000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.5))
    wait_idle(server)


def test_metrics_count_requests_and_tokens(server, client):
    before = metrics(server)
    out = client.completions.create(model="smol", prompt="Count: one, two,", max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    after = wait_idle(server)
    assert after["kvserve:generation_tokens_total"] - before["kvserve:generation_tokens_total"] == 5
    assert after["kvserve:prompt_tokens_total"] - before["kvserve:prompt_tokens_total"] == out.usage.prompt_tokens
    assert after["kvserve:e2e_request_latency_seconds_count"] == before["kvserve:e2e_request_latency_seconds_count"] + 1
    text = httpx.get(f"{server}/metrics").text
    assert 'kvserve:request_success_total{finished_reason="length",model_name="smol"}' in text
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "request_queue_time_seconds",
                 "request_prompt_tokens", "request_generation_tokens", "iteration_tokens_total",
                 "num_preemptions_total", "num_requests_waiting"):
        assert f"kvserve:{name}" in text


def test_repeated_prefix_reports_cached_tokens(server, client, smollm2_tokenizer):
    system = "You are the lighthouse keeper's assistant. " * 12  # well over a few 16-token blocks
    before = metrics(server)
    first = client.completions.create(model="smol", prompt=system + "Question one:", max_tokens=2, temperature=0)
    second = client.completions.create(model="smol", prompt=system + "Question two?", max_tokens=2, temperature=0)
    a, b = (smollm2_tokenizer.encode(system + q) for q in ("Question one:", "Question two?"))
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert common > 64 and cached == common // 16 * 16  # every full block of the common prefix
    after = wait_idle(server)
    hits = after["kvserve:prefix_cache_hits_total"] - before["kvserve:prefix_cache_hits_total"]
    queries = after["kvserve:prefix_cache_queries_total"] - before["kvserve:prefix_cache_queries_total"]
    assert hits == cached and queries == first.usage.prompt_tokens + second.usage.prompt_tokens


def _hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: row j is the distribution of token j + 1 given ids[:j + 1]."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def _stream_logprobs(server, body) -> tuple[str, dict]:
    """Join a streamed completion's text and its logprobs lists."""
    events = _sse(server, "/v1/completions", {**body, "stream": True})
    text, joined = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in events[:-1]:
        text += e["choices"][0]["text"]
        for key, values in (e["choices"][0]["logprobs"] or {}).items():
            joined[key] += values
    return text, joined


def test_completion_echo_logprobs_match_hf(server, hf_smollm2, smollm2_tokenizer):
    prompt = "The old clock in the hall struck"
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 3, "echo": True, "ignore_eos": True}
    choice = httpx.post(f"{server}/v1/completions", json=body, timeout=60).json()["choices"][0]
    lp = choice["logprobs"]
    prompt_ids = smollm2_tokenizer.encode(prompt)
    ids = prompt_ids + hf_greedy(hf_smollm2, prompt_ids, 6)
    assert choice["text"] == prompt + smollm2_tokenizer.decode(ids[len(prompt_ids):])
    assert lp["tokens"] == [smollm2_tokenizer.decode([t]) for t in ids]
    ref = _hf_logprobs(hf_smollm2, ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first token
    for j in range(1, len(ids)):
        expected = ref[j - 1]
        assert lp["token_logprobs"][j] == pytest.approx(expected[ids[j]].item(), abs=1e-3)
        top = lp["top_logprobs"][j]
        best = expected.topk(3)
        assert {smollm2_tokenizer.decode([t]) for t in best.indices.tolist()} <= set(top)
        assert lp["tokens"][j] in top and len(top) <= 4  # top 3 plus the chosen token
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx(best.values.tolist(), abs=1e-3)
    for token, offset in zip(lp["tokens"], lp["text_offset"]):
        assert choice["text"][offset:offset + len(token)] == token
    text, streamed = _stream_logprobs(server, body)
    assert text == choice["text"]
    assert streamed["tokens"] == lp["tokens"] and streamed["text_offset"] == lp["text_offset"]
    assert streamed["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"][1:], abs=1e-5)


def test_echo_with_max_tokens_zero_scores_the_prompt(server, client, smollm2_tokenizer):
    prompt = "Paris is the capital of France."
    out = client.completions.create(model="smol", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert out.choices[0].text == prompt
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(smollm2_tokenizer.encode(prompt))
    assert len(out.choices[0].logprobs.tokens) == out.usage.prompt_tokens
    assert all(len(top) == 1 for top in out.choices[0].logprobs.top_logprobs[1:])  # just the token itself
    plain = client.completions.create(model="smol", prompt=[prompt, prompt], max_tokens=3, temperature=0, echo=True)
    assert [c.text[:len(prompt)] for c in plain.choices] == [prompt, prompt] and plain.choices[0].logprobs is None


def test_chat_logprobs(server, client):
    messages = [{"role": "user", "content": "Name a colour."}]
    full = client.chat.completions.create(model="smol", messages=messages, temperature=0, max_tokens=12,
                                          logprobs=True, top_logprobs=2)
    content = full.choices[0].logprobs.content
    assert "".join(e.token for e in content) == full.choices[0].message.content
    assert len(content) == full.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token  # greedy: the best one
        assert e.top_logprobs[0].logprob == e.logprob >= e.top_logprobs[1].logprob
        assert bytes(e.bytes).decode() == e.token
    stream = client.chat.completions.create(model="smol", messages=messages, temperature=0, max_tokens=12,
                                            logprobs=True, top_logprobs=2, stream=True)
    streamed = [e for chunk in stream for e in (chunk.choices[0].logprobs.content if chunk.choices[0].logprobs else [])]
    assert [e.token for e in streamed] == [e.token for e in content]
    plain = client.chat.completions.create(model="smol", messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": messages, "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_streamed_n_choices_finish_once_each(server):
    body = {"prompt": "Once upon a time", "max_tokens": 5, "n": 3, "seed": 1, "stream": True}
    events = _sse(server, "/v1/completions", body)
    reasons = [(c["index"], c["finish_reason"]) for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
    assert sorted(i for i, _ in reasons) == [0, 1, 2]


def _hf_beam_texts(model, tokenizer, ids: list[int], k: int, n: int, max_new: int) -> list[str]:
    with torch.no_grad():
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                             num_beams=k, num_return_sequences=n, length_penalty=1.0,
                             pad_token_id=model.generation_config.eos_token_id)
    return [tokenizer.decode(row[len(ids):], skip_special_tokens=True) for row in out]


def test_beam_search_completion_matches_hf_and_streams_the_final_beams(server, client, hf_smollm2,
                                                                        smollm2_tokenizer):
    prompt = "The lighthouse keeper climbed the stairs and"
    want = _hf_beam_texts(hf_smollm2, smollm2_tokenizer, smollm2_tokenizer.encode(prompt), 4, 2, 16)
    full = client.completions.create(model="smol", prompt=prompt, max_tokens=16, n=2, best_of=4,
                                     extra_body={"use_beam_search": True})
    assert [c.text for c in sorted(full.choices, key=lambda c: c.index)] == want
    assert full.usage.completion_tokens == sum(len(smollm2_tokenizer.encode(t)) for t in want)
    events = _sse(server, "/v1/completions", {"prompt": prompt, "max_tokens": 16, "n": 2, "best_of": 4,
                                              "use_beam_search": True, "stream": True})
    assert events[-1] == "[DONE]"
    texts, reasons = ["", ""], [None, None]
    for chunk in events[:-1]:
        for c in chunk["choices"]:
            texts[c["index"]] += c["text"]
            reasons[c["index"]] = c["finish_reason"] or reasons[c["index"]]
    assert texts == want and reasons == [c.finish_reason for c in full.choices]


def test_beam_search_chat_matches_hf(client, hf_smollm2, smollm2_tokenizer):
    messages = [{"role": "user", "content": "Name a colour."}]
    ids = smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if not isinstance(ids, list) else ids)
    want = _hf_beam_texts(hf_smollm2, smollm2_tokenizer, ids, 3, 3, 20)
    out = client.chat.completions.create(model="smol", messages=messages, max_tokens=20, n=3,
                                         extra_body={"use_beam_search": True, "best_of": 3})
    assert [c.message.content for c in sorted(out.choices, key=lambda c: c.index)] == want


def test_contrastive_search_over_http_matches_the_reference(client, hf_smollm2, smollm2_tokenizer):
    from tests.engine.test_contrastive_search import MAX_NEW, reference

    prompt = "The lighthouse keeper climbed the stairs and"
    want, _ = reference(hf_smollm2, smollm2_tokenizer.encode(prompt), 0.6, 4, {smollm2_tokenizer.eos_token_id})
    out = client.completions.create(model="smol", prompt=prompt, max_tokens=MAX_NEW,
                                    extra_body={"penalty_alpha": 0.6, "top_k": 4})
    assert out.choices[0].text == smollm2_tokenizer.decode(want, skip_special_tokens=True)
