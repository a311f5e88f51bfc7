"""One request never harms another: each hostile request of the reliability issue, sent to a real
server on loopback, gets its 4xx while everyone else is served as if it had not been sent."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import torch

from tests.server.launch import launch, metrics, stop, wait_for, wait_idle

KEY = "sk-reliable"
AUTH = {"Authorization": f"Bearer {KEY}"}
SEQS, QUEUE = 8, 8  # --max-num-seqs, --max-queue-len: at most 8 sequences a request, 16 in flight
STORY = {"prompt": "Once upon a time, in a quiet village,", "max_tokens": 24, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(smollm2_dir):
    proc, base = launch(smollm2_dir, "--max-model-len", "512", "--api-key", KEY, "--max-num-seqs", str(SEQS),
                        "--max-queue-len", str(QUEUE), "--header-read-timeout", "1", "--body-read-timeout", "1")
    yield base
    stop(proc)


def _post(base: str, body: dict, path: str = "/v1/completions", **kw) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, headers=AUTH, timeout=120, **kw)


def _stream_text(base: str, body: dict, out: dict, key) -> None:
    text, reasons = "", []
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                reasons.append(choice["finish_reason"])
    out[key] = (text, [x for x in reasons if x])


@pytest.mark.parametrize("bad", [{"seed": 2**64}, {"seed": -2**63 - 1}, {"top_k": 2**63}])
def test_an_overflowing_field_beside_8_streams_harms_none_of_them(server, bad):
    alone = _post(server, STORY).json()["choices"][0]["text"]
    results: dict = {}
    streams = [threading.Thread(target=_stream_text, args=(server, STORY, results, i)) for i in range(8)]
    for t in streams:
        t.start()
    wait_for(lambda: metrics(server)["kvserve:num_requests_running"] > 0, "the streams to start")
    r = _post(server, {"prompt": "hi", "max_tokens": 2, **bad})
    assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(bad))
    for t in streams:
        t.join(timeout=120)
    assert results == {i: (alone, ["length"]) for i in range(8)}
    assert httpx.get(f"{server}/health").status_code == 200
    assert _post(server, STORY).json()["choices"][0]["text"] == alone


@pytest.mark.parametrize("body,param", [
    ({"prompt": "hi", "n": 291134416269}, "n"),
    ({"prompt": "hi", "n": SEQS + 1}, "n"),
    ({"prompt": ["a", "b", "c"], "n": 3}, "n"),
    ({"prompt": ["hi"] * (SEQS + 1)}, "prompt"),
])
def test_a_request_of_more_sequences_than_the_server_runs_is_400(server, body, param):
    r = _post(server, {**body, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert "sequences" in r.json()["error"]["message"]


def test_admission_counts_sequences_not_requests(server):
    long = {**STORY, "max_tokens": 400, "n": SEQS, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=long, headers=AUTH, timeout=60) as first, \
         httpx.stream("POST", f"{server}/v1/completions", json=long, headers=AUTH, timeout=60) as second:
        assert first.status_code == second.status_code == 200  # 16 sequences: the limit
        r = _post(server, {"prompt": "hi", "max_tokens": 1})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "16 of 16 sequences" in r.json()["error"]["message"]
        waiting = metrics(server)["kvserve:num_requests_waiting"]
        assert waiting <= QUEUE
    wait_idle(server)
    assert _post(server, {"prompt": ["a", "b"], "n": 4, "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/tokenize", {"prompt": "hi"}), ("POST", "/detokenize", {"tokens": [1, 2]}),
    ("GET", "/docs", None), ("GET", "/redoc", None), ("GET", "/static/docs/swagger-ui.css", None),
    ("GET", "/openapi.json", None), ("GET", "/v1/models", None),
    ("GET", "/no/such/route", None),
])
def test_every_route_but_health_and_metrics_needs_the_key(server, method, path, body):
    r = httpx.request(method, f"{server}{path}", json=body)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.request(method, f"{server}{path}", json=body, headers=AUTH).status_code in (200, 404)
    assert httpx.get(f"{server}/health").status_code == httpx.get(f"{server}/metrics").status_code == 200


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 123}]}]},
     "messages.0.content.0.text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
     "messages.0.content.0.text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, "messages.0.content.0.type"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/v1/completions", {"prompt": "hi", "frobnicate": 1}, "frobnicate"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "mood": "bad"}]}, "messages.0.mood"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": {
        "type": "function", "function": {"name": "g"}},
                              "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
     "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, "response_format"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "temperature": 1e308}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "stop": [str(i) for i in range(1000)]}, "stop"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"49152": 5}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"7": 101}}, "logit_bias.7"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
])
def test_malformed_unknown_and_unsupported_fields_are_400_naming_them(server, path, body, param):
    r = _post(server, body, path)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    if param == "frobnicate":
        assert r.json()["error"]["message"] == "Unrecognized request argument supplied: frobnicate"


def test_infinity_in_the_body_is_400(server):
    r = httpx.post(f"{server}/v1/completions", content=b'{"prompt": "hi", "temperature": Infinity}',
                   headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_fields_the_sdks_send_are_accepted(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    out = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                         user="u1", metadata={"a": "b"}, store=False, n=1,
                                         response_format={"type": "text"}, stream_options=None)
    assert out.choices[0].finish_reason in ("length", "stop")


def _raw(base: str, data: bytes, wait: float = 15.0) -> bytes:
    """Send raw bytes, read until the server closes (bounded)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_control_characters_in_x_request_id_are_replaced(server):
    reply = _raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-Id: \x1b[31mred\r\nConnection: close\r\n\r\n")
    head = reply.split(b"\r\n\r\n")[0].lower()
    assert b"\x1b" not in reply and b" 200 " in head.split(b"\r\n")[0]
    request_id = next(h for h in head.split(b"\r\n") if h.startswith(b"x-request-id:")).split(b":", 1)[1].strip()
    assert len(request_id) == 32 and request_id.isalnum()


def test_slow_headers_are_cut_off(server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=15) as s:
        s.sendall(b"GET /health HTTP/1.1\r\n")
        deadline = time.monotonic() + 15
        closed = False
        while time.monotonic() < deadline and not closed:
            try:
                s.sendall(b"X")  # a byte at a time, never finishing the headers
                s.settimeout(0.3)
                closed = s.recv(1) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
        assert closed, "the server kept a connection whose headers never ended"
    assert httpx.get(f"{server}/health").status_code == 200


def test_a_slow_body_gets_408(server):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{").encode()
    reply = _raw(server, head)
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply


@pytest.mark.parametrize("body", [{"prompt": "x" * 10_000_000}, {"prompt": list(range(1_400_000))}])
def test_a_10mb_prompt_gets_its_400_while_health_answers(server, body):
    """How long /health waits meanwhile is measured by `benchmarks/reliability.py --parts stall`
    (RELIABILITY.md); here: it answers, and the prompt is refused for its length."""
    data = json.dumps(body).encode()
    result = {}

    def send():
        result["r"] = httpx.post(f"{server}/v1/completions", content=data, headers={**AUTH, "content-type":
                                 "application/json"}, timeout=120)

    sender = threading.Thread(target=send)
    sender.start()
    while sender.is_alive():
        assert httpx.get(f"{server}/health", timeout=60).status_code == 200
    sender.join()
    assert result["r"].status_code == 400 and "maximum context length is 512" in result["r"].json()["error"]["message"]


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def body(self) -> bytes:
        return self.data


def test_big_bodies_and_long_prompts_are_handled_off_the_event_loop(smollm2_dir):
    """Parsing a 10 MB body or tokenizing a long prompt on the loop would stall every stream."""
    from transformers import AutoTokenizer

    from server.context import Offload
    from server.protocol import CompletionRequest

    seen = {}

    class Recorded(CompletionRequest):
        @classmethod
        def model_validate_json(cls, data, **kw):
            seen.setdefault("parse", []).append(threading.get_ident())
            return super().model_validate_json(data, **kw)

    def tokenize(tokenizer):
        seen.setdefault("tokenize", []).append(threading.get_ident())
        return tokenizer.encode("hello")

    async def run():
        work = Offload(AutoTokenizer.from_pretrained(smollm2_dir))
        for size in (100, Offload.INLINE_BODY_BYTES + 1):
            await work.parse(_Body(json.dumps({"prompt": "x" * size}).encode()), Recorded)
        for size in (100, Offload.INLINE_CHARS + 1):
            await work.tokenize(tokenize, size)

    asyncio.run(run())
    loop_thread = threading.get_ident()  # asyncio.run runs the loop on this thread
    assert [t == loop_thread for t in seen["parse"]] == [True, False]
    assert [t == loop_thread for t in seen["tokenize"]] == [True, False]


@pytest.mark.parametrize("model, body", [
    ("CompletionRequest", {"prompt": [-1] * 100_000}), ("CompletionRequest", {"prompt": [""] * 100_000}),
    ("CompletionRequest", {"prompt": [[1], []] * 50_000}), ("DetokenizeRequest", {"tokens": [-1] * 100_000}),
    ("ChatCompletionRequest", {"messages": [{"role": "nobody"}] * 100_000}),
    ("ChatCompletionRequest", {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}] * 100_000}]}),
])
def test_a_long_bad_list_stops_at_its_first_bad_item(model, body):
    """Not an error for every item (for every union member that is a list): that took seconds and
    memory for one 10 MB body, and a valid one 3x longer to check, holding the GIL throughout."""
    from pydantic import ValidationError

    from server import protocol

    with pytest.raises(ValidationError) as e:
        getattr(protocol, model).model_validate_json(json.dumps(body))
    assert e.value.error_count() <= 4  # at most one per member of the prompt's union


def test_openapi_documents_what_the_server_answers(server):
    spec = httpx.get(f"{server}/openapi.json", headers=AUTH).json()
    for path, item in spec["paths"].items():
        for op in item.values():
            assert "422" not in op["responses"], path
            if path not in ("/health", "/metrics"):
                overloaded = "529" if path.startswith("/v1/messages") else "503"  # Anthropic's code
                assert {"400", "401", "404", "413", "500", overloaded} <= set(op["responses"]), path
    post = spec["paths"]["/v1/chat/completions"]["post"]
    assert "text/event-stream" in post["responses"]["200"]["content"]
    body = post["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert "messages" in spec["components"]["schemas"][body]["properties"]
    r = httpx.get(f"{server}/v1/completions", headers=AUTH)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


# --- in-process: the catch-all, and a device fault that ends the server --------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_tokenizer):
    from tests.engine.test_models import make_tiny

    path = tmp_path_factory.mktemp("tiny")
    make_tiny(path, smollm2_tokenizer, "llama", {})
    return path


def test_an_unexpected_error_is_an_openai_shaped_500_with_the_request_id(tiny_dir):
    from engine import AsyncLLM
    from server.app import create_app

    engine = AsyncLLM.from_options(model=str(tiny_dir), num_kv_blocks=16)
    try:
        app = create_app(engine, "tiny")

        @app.get("/boom")
        async def boom():
            raise KeyError("a bug")

        async def call():
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                return await c.get("/boom", headers={"X-Request-Id": "abc-1"})

        r = asyncio.run(call())
        assert r.status_code == 500 and r.headers["x-request-id"] == "abc-1"
        err = r.json()["error"]
        assert err["type"] == "internal_server_error" and "abc-1" in err["message"]
    finally:
        engine.shutdown()


def test_a_device_fault_fails_health_and_stops_the_server(tiny_dir):
    from engine import AsyncLLM
    from server.app import create_app
    from server.cli import _DrainingServer
    from tests.server.launch import free_port

    engine = AsyncLLM.from_options(model=str(tiny_dir), num_kv_blocks=16)
    port = free_port()
    server = _DrainingServer(create_app(engine, "tiny"), engine, 5.0, host="127.0.0.1", port=port,
                             log_level="critical")
    runner = threading.Thread(target=server.run)
    runner.start()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _health(base) == 200, "the server to start")

        def lost(*args, **kwargs):
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

        engine.engine.runner.model.forward = lost
        r = httpx.post(f"{base}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2}, timeout=30)
        assert r.status_code == 500
        runner.join(timeout=30)
        assert not runner.is_alive() and engine.error is not None
    finally:
        server.server.should_exit = True
        runner.join(timeout=30)
        engine.shutdown()


def _health(base: str) -> int | None:
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code
    except httpx.HTTPError:
        return None
