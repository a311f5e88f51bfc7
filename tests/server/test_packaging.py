"""What users copy: README's examples (run as written, only the address changes), /docs, and the
Docker image's commands, against a server on the bundled default model."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys

import httpx
import pytest

from tests.server.launch import ROOT, free_port, launch, stop

README_URL = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def default_server(smollm2_dir):  # smollm2_dir: the bundled model is converted before the server starts
    proc, base = launch(None, name=None)
    yield base
    stop(proc)


def _blocks(language: str) -> list[str]:
    with open(f"{ROOT}/README.md") as f:
        return re.findall(rf"```{language}\n(.*?)```", f.read(), flags=re.S)


def _shell_commands(block: str) -> list[str]:
    """Whole commands of a shell block: lines join until the quoting closes and no backslash continues."""
    commands, pending = [], ""
    for line in block.splitlines():
        pending += line + "\n"
        try:
            shlex.split(pending)
        except ValueError:  # a quote is still open
            continue
        if not line.endswith("\\"):
            if pending.strip() and not pending.lstrip().startswith("#"):
                commands.append(pending.strip())
            pending = ""
    return commands


def _sse_payloads(text: str) -> list:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def _curl_commands(tools: bool) -> list[str]:
    """README's curl commands: those that send tools (run against the tools server) or the others."""
    return [c for b in _blocks("bash") for c in _shell_commands(b) if c.startswith("curl ")
            and ('"tools"' in c) == tools]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_examples(default_server):
    _run_curl(_curl_commands(tools=False), default_server, at_least=3)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_tool_curl_example(default_server):
    _run_curl(_curl_commands(tools=True), default_server, at_least=1, finish_reason="tool_calls")


def _run_curl(commands: list[str], server: str, at_least: int, finish_reason: str | None = None) -> None:
    assert len(commands) >= at_least
    for command in commands:
        assert README_URL in command
        run = subprocess.run(["bash", "-c", command.replace(README_URL, server)], capture_output=True,
                             text=True, timeout=300, check=False)
        assert run.returncode == 0, (command, run.stderr)
        if '"stream": true' in command:
            _check_stream(command, _sse_payloads(run.stdout))
            continue
        body = json.loads(run.stdout)
        assert body.get("error") is None, command
        if "/v1/responses" in command:
            assert body["status"] in ("completed", "incomplete") and body["output"], command
        elif "/v1/messages" in command:
            assert body["type"] == "message" and body["content"], command
        else:
            assert body["choices"], command
            assert finish_reason is None or body["choices"][0]["finish_reason"] == finish_reason


def _check_stream(command: str, payloads: list[str]) -> None:
    """A whole stream, as each protocol ends it: `[DONE]`, `response.completed`, or `message_stop`."""
    assert len(payloads) > 2, command
    events = [json.loads(p) for p in payloads if p != "[DONE]"]
    if "/v1/responses" in command:
        assert events[-1]["type"] in ("response.completed", "response.incomplete"), command
    elif "/v1/messages" in command:
        assert events[-1]["type"] == "message_stop" and "error" not in [e["type"] for e in events], command
    else:
        assert payloads[-1] == "[DONE]" and all("error" not in e for e in events), command


def test_readme_openai_sdk_example(default_server):
    (example,) = [b for b in _blocks("python") if "from openai import OpenAI" in b]
    assert README_URL in example
    run = subprocess.run([sys.executable, "-c", example.replace(README_URL, default_server)], capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout  # the greedy answer, as in test_openai_e2e


def _run_after_client(marker: str, server: str) -> str:
    """README's Python block holding `marker`, after the SDK example's client (as a reader runs
    them in turn), against `server`; its output."""
    (client,) = [b for b in _blocks("python") if "from openai import OpenAI" in b]
    (example,) = [b for b in _blocks("python") if marker in b]
    code = (client + example).replace(README_URL, server)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_readme_structured_outputs_sdk_example(default_server):
    out = _run_after_client(".parse(", default_server)
    assert re.search(r"city='[^']+' population=\d+", out), out  # the parsed pydantic object


def test_readme_responses_sdk_example(default_server):
    out = _run_after_client("previous_response_id=", default_server)
    assert "Paris" in out and len(out.strip().split(".")) > 2, out  # two answers


def test_readme_anthropic_sdk_example(default_server):
    (example,) = [b for b in _blocks("python") if "anthropic.Anthropic(" in b]
    run = subprocess.run([sys.executable, "-c", example.replace(README_URL, default_server)], capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout and run.stdout.strip().endswith("end_turn"), run.stdout


def test_readme_agents_sdk_example(default_server):
    (example,) = [b for b in _blocks("python") if "Runner." in b]
    run = subprocess.run([sys.executable, "-c", example.replace(README_URL, default_server)], capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert "18 C and sunny in Paris" in run.stdout, run.stdout  # the tool ran and its result reached the answer


def test_readme_tools_sdk_example(default_server):
    """README's tools example: a call, its result, the answer."""
    lines = _run_after_client("tools=tools", default_server).splitlines()
    assert lines[1].startswith("get_weather ") and json.loads(lines[1].split(" ", 1)[1])["city"]


def test_openapi_docs(default_server):
    page = httpx.get(f"{default_server}/docs")
    assert page.status_code == 200 and "swagger" in page.text.lower()
    spec = httpx.get(f"{default_server}/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize"} <= set(spec["paths"])


def _dockerfile_instruction(name: str) -> str:
    with open(f"{ROOT}/Dockerfile") as f:
        text = f.read().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    return line[len(name) + 1:].strip()


def test_dockerfile_runs_unprivileged_and_its_commands_work(default_server):
    # No Docker engine runs here: check what the image would run, with this checkout standing in for /app.
    assert _dockerfile_instruction("USER").split(":")[0] not in ("root", "0")
    assert _dockerfile_instruction("RUN make").startswith("install ")  # the bootstrap CI runs too
    cmd = json.loads(_dockerfile_instruction("CMD"))
    assert cmd[0] == "/app/.venv/bin/kvserve" and cmd[1] == "serve"
    from server.cli import build_parser
    assert build_parser().parse_args(cmd[1:]).host == "0.0.0.0"
    health = json.loads(_dockerfile_instruction("HEALTHCHECK").split(" CMD ", 1)[1])
    assert health[0] == "/app/.venv/bin/python" and "http://127.0.0.1:8000/health" in health[-1]

    def probe(base: str) -> int:
        argv = [sys.executable, *health[1:-1], health[-1].replace("http://127.0.0.1:8000", base)]
        return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode

    assert probe(default_server) == 0
    assert probe(f"http://127.0.0.1:{free_port()}") != 0  # nothing listens there: unhealthy
