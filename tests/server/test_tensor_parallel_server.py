"""The server under tensor parallelism: `kvserve serve --tensor-parallel-size 2` (ranks spawned),
under torchrun on one machine and README's two-node torchrun command (on loopback) give
transformers' greedy tokens; a rank that dies ends the server with a non-zero exit (a supervisor
restarts it), and neither that nor a killed server leaves a process behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import openai
import pytest

from tests.conftest import hf_greedy
from tests.engine.test_models import make_tiny
from tests.server.launch import descendants, free_port, launch, running, stop, wait_for

PROMPT = [5, 17, 300, 4000, 22]
MAX_NEW = 10
TP = ("--tensor-parallel-size", "2", "--num-kv-blocks", "32", "--block-size", "8", "--max-model-len", "128")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_tokenizer):
    path = tmp_path_factory.mktemp("tp-server")
    hf = make_tiny(path, smollm2_tokenizer, "llama", dict(num_key_value_heads=2))
    return path, smollm2_tokenizer.decode(hf_greedy(hf, PROMPT, MAX_NEW))


def _completion(base: str) -> str:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    out = client.completions.create(model="smol", prompt=PROMPT, max_tokens=MAX_NEW, temperature=0,
                                    extra_body={"ignore_eos": True})
    return out.choices[0].text


def _ranks(proc: subprocess.Popen) -> list[int]:
    """The spawned ranks' pids (multiprocessing's spawn children; not its resource tracker)."""
    def is_rank(pid: int) -> bool:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"spawn_main" in f.read()
    return [pid for pid in descendants(proc.pid) if is_rank(pid)]


def test_a_rank_that_dies_ends_the_server_non_zero(tiny):
    path, want = tiny
    proc, base = launch(path, *TP)
    try:
        assert _completion(base) == want
        ranks, below = _ranks(proc), descendants(proc.pid)
        assert len(ranks) == 1
        os.kill(ranks[0], signal.SIGKILL)
        with pytest.raises(openai.APIError):  # the step after the death fails; the engine is dead
            _completion(base)
        assert proc.wait(timeout=60) == 1
        assert "the engine failed" in proc.stdout.read()
        wait_for(lambda: not any(running(p) for p in below), "the server's child processes to exit")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_torchrun_starts_the_ranks_and_sigterm_stops_them_all(tiny):
    path, want = tiny
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    proc, base = launch(path, *TP, launcher=torchrun)
    try:
        below = descendants(proc.pid)
        assert _completion(base) == want
        assert httpx.get(f"{base}/health").status_code == 200
        proc.send_signal(signal.SIGTERM)  # torchrun passes it to both; rank 0 drains, then stops rank 1
        proc.wait(timeout=60)
        wait_for(lambda: not any(running(p) for p in below), "torchrun's workers to exit")
    finally:
        if proc.poll() is None:
            stop(proc)


def test_a_killed_server_leaves_no_rank_behind(tiny):
    """SIGKILL on rank 0 (the server: no drain, no stop message): its rank's next wait fails on the
    closed connection and it exits."""
    path, want = tiny
    proc, base = launch(path, *TP)
    try:
        assert _completion(base) == want
        below = descendants(proc.pid)
        assert _ranks(proc)
        proc.kill()
        proc.wait(timeout=30)
        wait_for(lambda: not any(running(p) for p in below), "the ranks of a killed server to exit")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_two_node_torchrun_command_serves_from_node_rank_0(tiny):
    """README's multi-node command, both "nodes" on loopback (one rank each): the serving rank is
    node-rank 0's, whichever node starts first; SIGTERM to it stops the other node's rank too."""
    path, want = tiny
    port = free_port()
    node = ("--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port))
    run = (sys.executable, "-m", "torch.distributed.run", *node)
    other = subprocess.Popen([*run, "--node-rank", "1", "-m", "server", "serve", "--model", str(path), *TP,
                              "--port", str(free_port())], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = None
    try:
        proc, base = launch(path, *TP, launcher=(*run, "--node-rank", "0"))
        assert _completion(base) == want
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert other.wait(timeout=60) == 0  # its rank was told to stop, and exited cleanly
    finally:
        for p in (other, proc):
            if p is not None and p.poll() is None:
                p.kill()


def test_a_launcher_world_unlike_the_tensor_parallel_size_is_refused_by_every_rank(tiny):
    """torchrun with 2 processes, --tensor-parallel-size 1: both exit 2 at once, naming the flag
    (rank 1 would otherwise wait out the timeout for a rank 0 that never joins)."""
    path, _ = tiny
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "server", "serve", "--model", str(path), "--port", str(free_port())],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.count("--tensor-parallel-size 2") + done.stdout.count("--tensor-parallel-size 2") >= 2
