"""Start a real `kvserve serve` on a free loopback port and read its metrics."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model_dir, *extra: str, name: str | None = "smol",
           launcher: tuple[str, ...] = (sys.executable,)) -> tuple[subprocess.Popen, str]:
    """The server process and its base URL, once /health answers 200 (bounded wait).

    model_dir None serves the bundled default model; name None keeps the model's own name;
    launcher: what runs `-m server` (e.g. torchrun and its flags).
    """
    port = free_port()
    args = ["--port", str(port), "--log-level", "warning", *extra]
    args += ["--model", str(model_dir)] if model_dir is not None else []
    args += ["--served-model-name", name] if name is not None else []
    proc = subprocess.Popen([*launcher, "-m", "server", "serve", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start: {proc.stdout.read()}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def descendants(pid: int) -> list[int]:
    """The processes below pid (children, theirs, ...), from /proc."""
    children = []
    for task in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else ():
        try:  # (a child belongs to the thread that started it)
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            pass
    return children + [d for c in children for d in descendants(c)]


def running(pid: int) -> bool:
    """Whether pid is a process that has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def metrics(base: str) -> dict[str, float]:
    """kvserve's samples by name (series with a finished_reason label left out)."""
    out = {}
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("kvserve:") and "finished_reason" not in line:
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


def wait_for(predicate, what: str, timeout: float = 30.0):
    """Poll until predicate() is truthy (bounded); fail naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def wait_idle(base: str) -> dict[str, float]:
    """Wait until no sequence runs and the KV pool is empty (an abort lands within an engine step)."""
    def idle():
        m = metrics(base)
        return m if m["kvserve:num_requests_running"] == 0 and m["kvserve:kv_cache_usage_perc"] == 0 else None
    return wait_for(idle, "running requests and KV usage to return to 0")
