"""Operating the server: API keys, admission control, body limits, request ids, SIGTERM drain."""
from __future__ import annotations

import json
import signal
import socket
import threading

import anthropic
import httpx
import openai
import pytest

from tests.server.launch import launch, metrics, stop, wait_for, wait_idle

KEY = "sk-test-123"
LONG = {"prompt": "Tell me a very long story.", "max_tokens": 4000, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def guarded(smollm2_dir):
    proc, base = launch(smollm2_dir, "--api-key", KEY, "--max-num-seqs", "1", "--max-queue-len", "1",
                        "--max-request-body", "1MiB")
    yield base
    stop(proc)


def _auth(key=KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_api_key_required_on_v1_only(guarded):
    for headers in ({}, _auth("wrong"), {"Authorization": KEY}):
        r = httpx.post(f"{guarded}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded}/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{guarded}/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model="smol", prompt="Hi", max_tokens=2).choices[0].text
    assert httpx.get(f"{guarded}/health").status_code == 200
    assert httpx.get(f"{guarded}/metrics").status_code == 200


def test_the_key_may_come_as_x_api_key_as_anthropics_clients_send_it(guarded):
    body = {"prompt": "Hi", "max_tokens": 1}
    assert httpx.post(f"{guarded}/v1/completions", json=body, headers={"x-api-key": KEY}).status_code == 200
    for headers in ({"x-api-key": "wrong"}, {"x-api-key": f"Bearer {KEY}"}, {"x-api-key": ""}):
        assert httpx.post(f"{guarded}/v1/completions", json=body, headers=headers).status_code == 401
    # Anthropic's routes refuse in Anthropic's shape, which its SDK reads
    r = httpx.post(f"{guarded}/v1/messages", json={}, headers={"x-api-key": "wrong"})
    assert r.status_code == 401 and r.json() == {"type": "error", "error": {
        "type": "authentication_error", "message": r.json()["error"]["message"]}}
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=guarded, api_key="wrong", max_retries=0).messages.create(
            model="smol", max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
    reply = anthropic.Anthropic(base_url=guarded, api_key=KEY, max_retries=0).messages.create(
        model="smol", max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
    assert reply.usage.output_tokens == 1


def test_oversized_body_is_413(guarded):
    r = httpx.post(f"{guarded}/v1/completions", content=json.dumps({"prompt": "x" * (2 << 20)}),
                   headers={**_auth(), "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.post(f"{guarded}/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                      headers=_auth()).status_code == 200


def _http_responses(base: str) -> dict[tuple[str, str], float]:
    """kvserve:http_requests_total by (route, status), from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for sample in family.samples:
            if sample.name == "kvserve:http_requests_total":
                assert sample.labels["model_name"] == "smol"
                out[sample.labels["route"], sample.labels["status"]] = sample.value
    return out


def test_http_responses_are_counted_by_route_and_status(guarded):
    before = _http_responses(guarded)
    assert httpx.get(f"{guarded}/v1/models", headers=_auth()).status_code == 200
    assert httpx.get(f"{guarded}/v1/models").status_code == 401
    for i in range(3):  # unknown paths share one series, whatever they are
        assert httpx.get(f"{guarded}/no/such/path/{i}", headers=_auth()).status_code == 404
    after = _http_responses(guarded)
    grew = {key: after[key] - before.get(key, 0.0) for key in after if after[key] != before.get(key, 0.0)}
    # (the /metrics scrape that read `before` is counted too)
    assert grew == {("/v1/models", "200"): 1, ("/v1/models", "401"): 1, ("other", "404"): 3,
                    ("/metrics", "200"): 1}


def test_request_id_is_echoed(guarded):
    r = httpx.get(f"{guarded}/health", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(httpx.get(f"{guarded}/health").headers["x-request-id"]) == 32  # generated when absent


def test_queue_limit_rejects_with_503_and_retry_after(guarded):
    # max_num_seqs 1 + max_queue_len 1: two long requests fill the server, the third is refused
    with httpx.stream("POST", f"{guarded}/v1/completions", json={**LONG, "stream": True}, headers=_auth(),
                      timeout=60) as first, \
         httpx.stream("POST", f"{guarded}/v1/completions", json={**LONG, "stream": True}, headers=_auth(),
                      timeout=60) as second:
        assert first.status_code == second.status_code == 200
        r = httpx.post(f"{guarded}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers=_auth())
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "capacity" in r.json()["error"]["message"]
    wait_idle(guarded)  # the aborted requests are gone and their blocks back in the pool
    assert httpx.post(f"{guarded}/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                      headers=_auth()).status_code == 200


def _send_and_vanish(base: str, body: dict) -> None:
    """A client that sends a whole request and leaves before any byte of the answer."""
    host, port = base.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(head + data)


def test_clients_gone_before_the_first_byte_give_their_slots_back(guarded):
    for _ in range(12):
        _send_and_vanish(guarded, {**LONG, "stream": True})
    wait_idle(guarded)
    assert wait_for(lambda: _two_streams_admitted(guarded), "both admission slots to be free", timeout=20)
    wait_idle(guarded)


def _two_streams_admitted(base: str) -> bool:
    """Capacity is 2 (max_num_seqs 1 + max_queue_len 1): are two streams let in at once?"""
    with httpx.stream("POST", f"{base}/v1/completions", json={**LONG, "stream": True}, headers=_auth(),
                      timeout=60) as first, \
         httpx.stream("POST", f"{base}/v1/completions", json={**LONG, "stream": True}, headers=_auth(),
                      timeout=60) as second:
        return first.status_code == second.status_code == 200


def test_sigterm_drains_then_aborts_then_exits_0(smollm2_dir):
    proc, base = launch(smollm2_dir, "--shutdown-timeout", "10")
    events: list = []
    short: dict = {}

    def stream_long():
        with httpx.stream("POST", f"{base}/v1/completions", json={**LONG, "stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])

    def run_short():
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "Hello", "max_tokens": 20, "ignore_eos": True,
                                                       "temperature": 0}, timeout=120)
        short.update(status=r.status_code, body=r.json())

    try:
        threads = [threading.Thread(target=stream_long), threading.Thread(target=run_short)]
        for t in threads:
            t.start()
        wait_for(lambda: metrics(base)["kvserve:num_requests_running"] == 2, "both requests to run")
        proc.send_signal(signal.SIGTERM)
        r = wait_for(lambda: (x := httpx.post(f"{base}/v1/completions", json={"prompt": "Hi"})).status_code == 503
                     and x, "new requests to be refused")
        assert "shutting down" in r.json()["error"]["message"]
        for t in threads:
            t.join(timeout=60)
        assert short["status"] == 200 and short["body"]["choices"][0]["finish_reason"] == "length"
        assert events[-1] == "[DONE]"
        reasons = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
        assert reasons.count("abort") == 1 and reasons[-1] == "abort"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
