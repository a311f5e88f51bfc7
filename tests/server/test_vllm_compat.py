"""A drop-in for vLLM's server: its request extras, its flags, CORS, JSON-only bodies, and tools on
the default server, over HTTP on a real server with the real openai SDK."""
from __future__ import annotations

import functools
import http.server
import json
import re
import subprocess
import threading

import httpx
import openai
import pytest
import torch

from tests.server.launch import free_port, launch, stop

ORIGIN = "http://app.example"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2_dir):
    """The bundled model with no --chat-template, browsers of one origin allowed."""
    proc, base = launch(smollm2_dir, "--allowed-origins", json.dumps([ORIGIN]), "--trust-request-chat-template")
    yield base
    stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)


def _post(server: str, path: str, body: dict) -> dict:
    r = httpx.post(f"{server}/v1/{path}", json={"model": "smol", **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _events(server: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server}/v1/{path}", json={"model": "smol", "stream": True, **body}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def _ids(rendered) -> list[int]:
    return list(rendered if isinstance(rendered, list) else rendered["input_ids"])


def test_guidellms_stream_options_give_usage_in_every_chunk(server):
    """guidellm's default benchmark sends continuous_usage_stats (every request failed before)."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    for path, body in (("completions", {"prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": True}),
                       ("chat/completions", {"messages": MESSAGES, "max_tokens": 12})):
        chunks = _events(server, path, {**body, "stream_options": options, "temperature": 0})
        assert all("usage" in c for c in chunks)
        counts = [c["usage"]["completion_tokens"] for c in chunks]
        assert counts == sorted(counts) and counts[-1] == chunks[-1]["usage"]["completion_tokens"]
        assert chunks[-1]["choices"] == [] and counts[-1] == (12 if path == "completions" else counts[-1]) > 0
        assert {c["usage"]["prompt_tokens"] for c in chunks} == {chunks[-1]["usage"]["prompt_tokens"]}


def test_completion_extras_change_the_output_as_vllm_documents(server, smollm2_tokenizer):
    prompt = "The lighthouse keeper climbed the stairs and"
    base = _post(server, "completions", {"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
    text = base["choices"][0]["text"]
    stop = text[4:8]
    kept = _post(server, "completions", {"prompt": prompt, "max_tokens": 16, "temperature": 0, "stop": [stop],
                                         "include_stop_str_in_output": True})
    assert kept["choices"][0]["text"] == text[:text.index(stop)] + stop
    ids = smollm2_tokenizer.encode(prompt)
    cut = _post(server, "completions", {"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True,
                                        "truncate_prompt_tokens": 4})
    by_hand = _post(server, "completions", {"prompt": ids[-4:], "max_tokens": 16, "temperature": 0,
                                            "ignore_eos": True})
    assert cut["choices"][0]["text"] == by_hand["choices"][0]["text"] and cut["usage"]["prompt_tokens"] == 4
    allowed = smollm2_tokenizer.encode(" the a of and", add_special_tokens=False)
    only = _post(server, "completions", {"prompt": prompt, "max_tokens": 8, "temperature": 1.0, "seed": 1,
                                         "allowed_token_ids": allowed, "logprobs": 0,
                                         "return_tokens_as_token_ids": True})
    tokens = only["choices"][0]["logprobs"]["tokens"]
    assert tokens and all(t.startswith("token_id:") and int(t.split(":")[1]) in allowed for t in tokens)
    word = text.split()[1]
    banned = _post(server, "completions", {"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True,
                                           "bad_words": [word]})
    assert word not in banned["choices"][0]["text"].split()
    named = _post(server, "completions", {"prompt": prompt, "max_tokens": 1, "request_id": "bench-42.a"})
    assert named["id"] == "cmpl-bench-42.a"


def test_prompt_logprobs_are_transformers(server, smollm2_tokenizer, hf_smollm2):
    prompt = "The lighthouse keeper climbed the stairs"
    ids = smollm2_tokenizer.encode(prompt)
    out = _post(server, "completions", {"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2})
    entries = out["choices"][0]["prompt_logprobs"]
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0].log_softmax(-1)  # [T, V]
    assert entries[0] is None and len(entries) == len(ids)
    for pos, entry in enumerate(entries[1:], 1):
        mine = entry[str(ids[pos])]
        assert mine["logprob"] == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-3)
        assert mine["rank"] == int((ref[pos - 1] > ref[pos - 1, ids[pos]]).sum()) + 1
        assert mine["decoded_token"] == smollm2_tokenizer.decode([ids[pos]])
        best = [e for e in entry.values() if e["rank"] <= 2]
        assert sorted(e["logprob"] for e in best) == pytest.approx(sorted(ref[pos - 1].topk(2).values.tolist()),
                                                                 abs=1e-3)
    chat = _post(server, "chat/completions", {"messages": MESSAGES, "max_tokens": 1, "prompt_logprobs": 0})
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "x", "prompt_logprobs": 1, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"


def test_chat_rendering_extras(server, smollm2_tokenizer):
    start = "The capital of France is"
    messages = [*MESSAGES, {"role": "assistant", "content": start}]
    cont = _post(server, "chat/completions", {"messages": messages, "max_tokens": 8, "temperature": 0,
                                              "continue_final_message": True, "echo": True})
    # the prompt ends inside the assistant's turn: the answer continues the text given
    want = _ids(smollm2_tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=True))
    assert cont["usage"]["prompt_tokens"] == len(want)
    assert cont["choices"][0]["message"]["content"].startswith(start + " Paris")
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": messages, "continue_final_message": True,
                                                          "add_generation_prompt": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"
    open_turn = _post(server, "chat/completions", {"messages": MESSAGES, "max_tokens": 1,
                                                   "add_generation_prompt": False})
    assert open_turn["usage"]["prompt_tokens"] == len(_ids(smollm2_tokenizer.apply_chat_template(MESSAGES)))
    template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}{{ documents | length }}"
    own = _post(server, "chat/completions", {"messages": MESSAGES, "max_tokens": 1, "chat_template": template,
                                             "documents": [{"title": "a", "text": "b"}]})
    assert own["usage"]["prompt_tokens"] == len(smollm2_tokenizer.encode(MESSAGES[0]["content"] + "|1"))


def test_add_special_tokens_adds_the_tokenizers_own(smollm2_dir, tmp_path):
    """SmolLM2's tokenizer adds nothing; one made to add a BOS shows the switch on both routes' paths."""
    from transformers import AutoTokenizer

    from server.prompting import chat_ids

    tok = AutoTokenizer.from_pretrained(smollm2_dir, add_bos_token=True, bos_token="<|endoftext|>")
    plain = chat_ids(tok, MESSAGES)
    assert chat_ids(tok, MESSAGES, add_special_tokens=True) == [tok.bos_token_id, *plain]
    assert plain[0] != tok.bos_token_id


def test_newer_openai_fields_are_accepted(client):
    out = client.chat.completions.create(model="smol", messages=MESSAGES, max_tokens=4, prompt_cache_key="k1",
                                         safety_identifier="user-7", verbosity="low", reasoning_effort="low")
    assert out.choices[0].finish_reason in ("length", "stop")


def test_tools_work_on_the_default_server(client):
    """No --chat-template: SmolLM2 is served with the shipped template that shows it tools."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}]
    out = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                         tools=tools, tool_choice="required", max_tokens=60)
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)


def test_cors_preflight_and_simple_requests(server):
    pre = httpx.options(f"{server}/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(f"{server}/v1/chat/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers
    r = httpx.get(f"{server}/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_bodies_that_are_not_json_get_415(server, content_type):
    """A browser sends text/plain cross-site without a preflight: the body must not be served."""
    headers = {"content-type": content_type} if content_type else {}
    body = json.dumps({"model": "smol", "prompt": "hi", "max_tokens": 1}).encode()
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/v1/messages"):
        r = httpx.post(f"{server}{path}", content=body, headers=headers)
        assert r.status_code == 415, (path, r.text)
    ok = httpx.post(f"{server}/v1/completions", content=body,
                    headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


@pytest.mark.parametrize("body,param", [
    ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
    ({"request_id": "a b"}, "request_id"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"cache_salt": "tenant-1"}, "cache_salt"),  # a field of vLLM's refused here: the 400 says why
    ({"kv_transfer_params": {}}, "kv_transfer_params"),
])
def test_extras_out_of_range_are_400_naming_them(server, body, param):
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "hi", **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    from server.errors import VLLM_FIELDS_NOT_SERVED

    if param in VLLM_FIELDS_NOT_SERVED:
        assert VLLM_FIELDS_NOT_SERVED[param] in r.json()["error"]["message"]


def test_request_chat_template_needs_the_flag(tool_server):
    """(tool_server runs without --trust-request-chat-template)"""
    r = httpx.post(f"{tool_server}/v1/chat/completions", json={"messages": MESSAGES, "chat_template": "{{ 'x' }}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"
    assert "--trust-request-chat-template" in r.json()["error"]["message"]


def test_a_refusal_is_logged_with_its_type_and_field(caplog):
    """An operator sees why a client fails without reading bodies: type, code and field, sanitised."""
    from server.errors import APIError

    with caplog.at_level("INFO", logger="kvserve.server"):
        APIError(400, "secret body text", param="messages.0.\x1b[31mcontent" + "x" * 200).log(
            "r1", "POST", "/v1/chat/completions")
        APIError(415, "no", code="unsupported_media_type").log("r2", "POST", "/v1/completions")
    first, second = caplog.messages
    assert first.startswith("request r1: POST /v1/chat/completions -> 400 invalid_request_error param=messages.0.?[31m")
    assert "\x1b" not in first and len(first) < 200 and "secret" not in first
    assert second == "request r2: POST /v1/completions -> 415 invalid_request_error code=unsupported_media_type"


# The page's script: a JSON POST (its content type makes the browser send a CORS preflight first),
# its outcome written into the DOM for --dump-dom. A no-cors GET of /health beside it shows the
# server was reachable from the page, so a failed fetch is the browser's CORS check and nothing else.
_PAGE = """<!doctype html><html><body><pre id="out">pending</pre><script>
const KVSERVE = __KVSERVE__, out = document.getElementById("out");
(async () => {
  const reach = await fetch(KVSERVE + "/health", {mode: "no-cors"}).then(r => r.type, e => "unreachable");
  try {
    const r = await fetch(KVSERVE + "/v1/chat/completions", {method: "POST",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify({model: "smol",
      messages: [{role: "user", content: "Hi"}], max_tokens: 4, temperature: 0})});
    const body = await r.json();
    out.textContent = `${reach} ${r.status} ${body.object}`;
  } catch (e) {
    out.textContent = `${reach} ${e.name}: ${e.message}`;
  }
})();
</script></body></html>"""


@pytest.fixture
def page_site(server, tmp_path):
    """The page above, served by a second loopback HTTP server (another origin than kvserve's); its port."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text(_PAGE.replace("__KVSERVE__", json.dumps(server)))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(Quiet, directory=str(tmp_path / "site")))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def _page_result(chromium: str, origin_host: str, page_port: int, server: str, tmp_path) -> tuple[str, list[str]]:
    """Load http://<origin_host>/ in headless Chromium, the host mapped to the page server, so the
    page's origin is exactly http://<origin_host>; all other names resolve nowhere and all else goes
    to a dead proxy (as in test_docs_offline), but for the page's host, which bypasses it to reach
    loopback. What the page's script wrote, and the methods of the requests to the chat route
    (from Chromium's net log: the preflight is one).

    No Private/Local Network Access flag is needed: the page itself comes from 127.0.0.1, so Chromium
    puts it in the loopback address space, kvserve's own, and a loopback-to-loopback fetch is not gated.
    --proxy-bypass-list is needed: Chromium bypasses the proxy by name (localhost, 127.0.0.1), not by
    the address a MAP rule gives, so without it the page's own load would go to the dead proxy."""
    netlog = tmp_path / f"{origin_host}.json"
    run = subprocess.run([
        chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / origin_host}",
        f"--host-resolver-rules=MAP {origin_host} 127.0.0.1:{page_port}, MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--proxy-server=http://127.0.0.1:{free_port()}", f"--proxy-bypass-list={origin_host}",
        f"--log-net-log={netlog}", "--virtual-time-budget=10000", "--dump-dom", f"http://{origin_host}/",
    ], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    found = re.search(r'<pre id="out">(.*?)</pre>', run.stdout, flags=re.S)
    assert found, run.stdout[-3000:] + run.stderr[-3000:]
    with open(netlog) as f:
        log = json.load(f)
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    methods = [e["params"]["method"] for e in log["events"] if e["type"] == start_job
               and e.get("params", {}).get("url") == f"{server}/v1/chat/completions"]
    return found.group(1), methods


def test_a_browser_page_of_an_allowed_origin_can_call_the_server(chromium, server, page_site, tmp_path):
    """A real browser's CORS: a page of http://app.example (--allowed-origins) gets its answer after
    the preflight; the same page from another origin reaches the server but may not read it."""
    assert _page_result(chromium, "app.example", page_site, server, tmp_path) == (
        "opaque 200 chat.completion", ["OPTIONS", "POST"])
    # the preflight is refused: the POST is never sent (the no-cors "opaque": the server was reachable)
    assert _page_result(chromium, "other.example", page_site, server, tmp_path) == (
        "opaque TypeError: Failed to fetch", ["OPTIONS"])


def test_langchain_bind_tools_on_the_default_server(server):
    """LangChain's ChatOpenAI with bind_tools, on the server started with no --chat-template."""
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "sunny"

    llm = ChatOpenAI(base_url=f"{server}/v1", api_key="none", model="smol", temperature=0, max_tokens=60,
                     max_retries=0, timeout=120)
    reply = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert len(reply.tool_calls) == 1, reply
    call = reply.tool_calls[0]
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str), call
