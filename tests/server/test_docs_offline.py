"""/docs (Swagger UI) and /redoc (ReDoc) work offline: their scripts, styles and favicon come from
the server (server/docs.py), never from a CDN. The HTML is read in-process and from a real server;
then a real headless Chromium that can reach nothing but loopback renders both pages."""
from __future__ import annotations

import html
import json
import re
import subprocess

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.docs import STATIC_URL, mount_docs
from tests.server.launch import free_port

PAGES = ("/docs", "/redoc", "/docs/oauth2-redirect")
CONTENT_TYPES = {".js": ("text/javascript", "application/javascript"), ".css": ("text/css",), ".png": ("image/png",)}
# Where a page names what it loads: attributes, and Swagger UI's `url: '/openapi.json'`.
_REFERENCE = re.compile(r"""\b(?:src|href|spec-url)=["']([^"']*)["']|\burl: *["']([^"']*)["']""")


def _references(page: str) -> list[str]:
    return [a or b for a, b in _REFERENCE.findall(page)]


@pytest.fixture(scope="module", params=["in-process", "server"])
def site(request):
    """An HTTP client of an app with the docs: a bare FastAPI app with mount_docs (in-process, no
    model), or the real server (`tool_server`, tests/server/conftest.py) that create_app wires."""
    if request.param == "server":
        with httpx.Client(base_url=request.getfixturevalue("tool_server")) as client:
            yield client
        return
    app = FastAPI(title="kvserve", docs_url=None, redoc_url=None)
    mount_docs(app)
    app.get("/v1/models")(lambda: {})
    with TestClient(app) as client:
        yield client


def test_the_pages_name_nothing_outside_the_server_and_all_they_name_answers(site):
    for page in PAGES:
        r = site.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), page
        assert not re.findall(r"https?://\S*", r.text), page  # no CDN, no fonts, no outside favicon
        assert r.headers["content-security-policy"].startswith("default-src 'self' "), page
        references = _references(r.text)
        assert all(url.startswith("/") and not url.startswith("//") for url in references), (page, references)
        for url in references:
            asset = site.get(url)
            assert asset.status_code == 200, url
            if url.startswith(STATIC_URL):
                suffix = url[url.rindex("."):]
                assert asset.headers["content-type"].split(";")[0] in CONTENT_TYPES[suffix], url
    assert {f"{STATIC_URL}/{f}" for f in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")} <= set(
        _references(site.get("/docs").text))
    assert {f"{STATIC_URL}/{f}" for f in ("redoc.standalone.js", "favicon.png")} <= set(
        _references(site.get("/redoc").text))


def test_the_assets_answer_get_and_head_and_refuse_other_methods(site):
    assert site.head(f"{STATIC_URL}/redoc.standalone.js").status_code == 200
    r = site.post(f"{STATIC_URL}/swagger-ui.css", json={})
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "HEAD"}
    assert site.get(f"{STATIC_URL}/no-such.js").status_code == 404


def test_the_pages_are_not_in_the_openapi_document(site):
    paths = set(site.get("/openapi.json").json()["paths"])
    assert "/v1/models" in paths
    assert not [p for p in paths if p.startswith(("/docs", "/redoc", "/static"))]


def _load(chromium: str, url: str, tmp_path) -> tuple[str, list[str]]:
    """Load url in headless Chromium that reaches only loopback (names resolve nowhere, and all
    else goes to a proxy on a port nothing listens on; Chromium never proxies loopback): the DOM
    once the page has settled, and every URL the page itself asked for (from Chromium's net log).
    A screenshot is left in tmp_path."""
    netlog, screenshot = tmp_path / "netlog.json", tmp_path / "page.png"
    run = subprocess.run([
        chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", f"--proxy-server=http://127.0.0.1:{free_port()}",
        f"--log-net-log={netlog}", "--window-size=1280,1600", "--virtual-time-budget=10000",
        f"--screenshot={screenshot}", "--dump-dom", url,
    ], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0 and screenshot.stat().st_size > 0, run.stderr[-3000:]
    with open(netlog) as f:
        log = json.load(f)
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    origin = re.match(r"https?://[^/]+", url).group()
    asked = [e["params"]["url"] for e in log["events"] if e["type"] == start_job
             and e.get("params", {}).get("initiator") == origin]  # the page's requests, not the browser's own
    return run.stdout, asked


def _asked_only_the_server(asked: list[str], base: str, *needed: str) -> None:
    outside = [u for u in asked if not u.startswith(base + "/")]
    assert not outside, f"the page asked outside the server: {outside}"
    assert {base + n for n in needed} <= set(asked), asked  # (the net log was read: the page's own loads are in it)


def test_swagger_ui_renders_every_operation_offline_in_chromium(chromium, tool_server, tmp_path):
    dom, asked = _load(chromium, f"{tool_server}/docs", tmp_path)
    _asked_only_the_server(asked, tool_server, f"{STATIC_URL}/swagger-ui-bundle.js", f"{STATIC_URL}/swagger-ui.css",
                           "/openapi.json")
    paths = set(httpx.get(f"{tool_server}/openapi.json").json()["paths"])
    assert "/v1/chat/completions" in paths
    rendered = set(re.findall(r'<div class="opblock opblock-\w+[^>]*>.*?data-path="([^"]+)"', dom, flags=re.S))
    assert rendered == paths, dom[:3000]


def test_redoc_renders_every_operation_offline_in_chromium(chromium, tool_server, tmp_path):
    dom, asked = _load(chromium, f"{tool_server}/redoc", tmp_path)
    _asked_only_the_server(asked, tool_server, f"{STATIC_URL}/redoc.standalone.js", "/openapi.json")
    spec = httpx.get(f"{tool_server}/openapi.json").json()
    summaries = {op["summary"] for item in spec["paths"].values() for op in item.values() if "summary" in op}
    assert summaries and not [s for s in summaries if s not in html.unescape(dom)], dom[:3000]
    assert "/v1/chat/completions" in dom
