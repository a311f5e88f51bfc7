"""Tensor parallelism on CPU: step time and memory per rank, TP=1 against TP=N, side by side.

    python benchmarks/tensor_parallel.py [--seqs 1,8] [--json PATH]

Two models, each at TP=1 and split: the bundled SmolLM2-135M (real weights, its default GGUF-block
linears; 9 heads and 3 KV heads, so it splits over 3 ranks, not 2), and a random checkpoint of
SmolLM2's size whose heads split over 2 (8 heads and 2 KV heads of 64, 30 layers, hidden 576,
MLP 1536; load_format dummy). Each run: `seqs` sequences of 64 random prompt tokens, 64 greedy
tokens each; reported: the median wall time of the prefill step and of the decode steps, the
weights and KV pool one rank holds, the resident memory of every rank's process, and how long
rank 0 spent in the model's collectives (all-reduces, the logits' gather) in a decode step
(median; with TP=1 they return at once). A short warm-up request runs first (gloo connects lazily).

The all-reduce cost: gloo's latency for one all-reduce of a [rows, 576] float32 tensor between 2
processes on this machine (median of 200), back to back and with a few matmuls on each rank before
each (as in a forward); a decode step of the 30-layer model runs 61 of them (2 a layer and the
embedding's) and one gather of the logits.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine import SamplingParams, platform
from engine.core.config import EngineConfig
from engine.frontend.llm_engine import LLMEngine
from engine.layers.parallel import TensorParallel
from engine.models.loader import bundled_model_dir

SPLIT_BY_2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                  tie_word_embeddings=True)
PROMPT, NEW = 64, 64


def checkpoint(root: str) -> str:
    """A config and tokenizer of SmolLM2's size (no weights: the runs use load_format dummy)."""
    from transformers import AutoTokenizer, LlamaConfig

    LlamaConfig(**SPLIT_BY_2).save_pretrained(root)
    AutoTokenizer.from_pretrained(bundled_model_dir()).save_pretrained(root)
    return root


class COLLECTIVES:
    """Seconds rank 0 spent this step in the model's collectives (its all-reduces and the gather)."""

    seconds = 0.0

    @classmethod
    def timed(cls, method):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                cls.seconds += time.perf_counter() - start
        return wrapper


TensorParallel.all_reduce = COLLECTIVES.timed(TensorParallel.all_reduce)  # (rank 0: this process)
TensorParallel.gather_first = COLLECTIVES.timed(TensorParallel.gather_first)


def model_bytes(model: torch.nn.Module) -> int:
    """Every tensor the model holds once: parameters, buffers and the layers' own (packed weights,
    GGUF blocks), each storage counted once."""
    seen, total = set(), 0
    for m in model.modules():
        for t in [*m._parameters.values(), *m._buffers.values(), *vars(m).values()]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.untyped_storage().nbytes()
    return total


def rss_mib(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def run(model: str | None, tp: int, num_seqs: int, dummy: bool, device: str) -> dict:
    engine = LLMEngine(EngineConfig(model=model, device=device, tensor_parallel_size=tp, num_kv_blocks=8 * num_seqs + 8,
                                    max_model_len=256, max_num_seqs=num_seqs, enable_prefix_caching=False,
                                    load_format="dummy" if dummy else "auto", disable_log_stats=True))
    try:
        engine.add_request("warm-up", [1, 2, 3], SamplingParams(max_tokens=2))  # (gloo connects lazily)
        while engine.has_unfinished_requests():
            engine.step()
        gen = torch.Generator().manual_seed(1)
        params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
        for i in range(num_seqs):
            engine.add_request(str(i), torch.randint(100, 40000, (PROMPT,), generator=gen).tolist(), params)
        seconds, in_collectives = [], []
        while engine.has_unfinished_requests():
            COLLECTIVES.seconds = 0.0
            start = time.perf_counter()
            engine.step()  # (its sampled tokens are on the host: the step has finished on a GPU too)
            seconds.append(time.perf_counter() - start)
            in_collectives.append(COLLECTIVES.seconds)
        weights = model_bytes(engine.runner.model)
        kv = sum(c.numel() * c.element_size() for c in engine.runner.kv_caches)
        ranks = [] if engine.executor.ranks is None else engine.executor.ranks.procs
        return {"prefill_ms": 1000 * seconds[0], "decode_ms": 1000 * statistics.median(seconds[1:]),
                "decode_collectives_ms": 1000 * statistics.median(in_collectives[1:]),
                "weights_mib_per_rank": weights / 2**20, "kv_mib_per_rank": kv / 2**20,
                "rss_mib": [rss_mib()] + [rss_mib(p.pid) for p in ranks],
                "linears": platform.linear_kinds(engine.runner.model)}
    finally:
        engine.close()


def _all_reduce_rank(rank: int, port: int, rows: list[int], gaps: list[int], device: str, out) -> None:
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=2, timeout=timedelta(seconds=60))
    torch.set_default_device(device)
    w = torch.randn(SPLIT_BY_2["hidden_size"], SPLIT_BY_2["intermediate_size"] // 2)  # a rank's half of up_proj
    result = {}
    for n in rows:
        x, v = torch.randn(n, SPLIT_BY_2["hidden_size"]), torch.randn(n, SPLIT_BY_2["hidden_size"])
        for gap in gaps:
            for _ in range(20):
                dist.all_reduce(x)
            times = []
            for _ in range(200):
                for _ in range(gap):  # (each rank computes between the all-reduces, as in a forward)
                    v @ w
                start = time.perf_counter()
                dist.all_reduce(x)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            result[f"{n} rows, {gap} matmuls between"] = 1e6 * statistics.median(times)
    if rank == 0:
        out.put(result)
    dist.destroy_process_group()


def all_reduce_us(rows: list[int], gaps: list[int], device: str) -> dict[str, float]:
    """Median microseconds of one all-reduce (gloo; NCCL on cuda) of [n, hidden] float32 between 2 processes,
    back to back (gap 0) and with `gap` [n, 576] x [576, 768] matmuls on each rank before each."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_all_reduce_rank, args=(r, port, rows, gaps, device, out))
             for r in range(2)]
    for p in procs:
        p.start()
    result = out.get(timeout=600)
    for p in procs:
        p.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="1,8")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: the ranks on GPUs over NCCL (needs 2; the bundled model's 3 ranks need 3)")
    args = ap.parse_args()
    seqs = [int(v) for v in args.seqs.split(",")]
    print(f"torch {torch.__version__}, {os.cpu_count()} cores; {PROMPT} prompt tokens, {NEW} new, greedy\n")
    results: dict = {"device": args.device,
                     "all_reduce_us": all_reduce_us(sorted({*seqs, PROMPT * max(seqs)}), [0, 5], args.device)}
    print(f"{'NCCL' if args.device == 'cuda' else 'gloo'} all-reduce of [rows, 576] float32, 2 processes, median us:")
    for what, us in results["all_reduce_us"].items():
        print(f"  {what}: {us:.0f}")
    print("| model | TP | linears | sequences | prefill step ms | decode step ms | of which collectives, rank 0 "
          "| weights MiB / rank | KV MiB / rank | RSS MiB per process |\n|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as root:
        models = {"SmolLM2-135M (bundled, GGUF blocks)": (None, 3, False),
                  "SmolLM2-size, 8 heads / 2 KV (dummy)": (checkpoint(root), 2, True)}
        gpus = torch.cuda.device_count() if args.device == "cuda" else None
        for name, (path, split, dummy) in models.items():
            if gpus is not None and split > gpus:
                continue
            for n in seqs:
                for tp in (1, split):
                    r = results.setdefault(name, {}).setdefault(str(n), {})[tp] = run(path, tp, n, dummy, args.device)
                    print(f"| {name} | {tp} | {r['linears']} | {n} | {r['prefill_ms']:.1f} | {r['decode_ms']:.2f} "
                          f"| {r['decode_collectives_ms']:.2f} | {r['weights_mib_per_rank']:.0f} "
                          f"| {r['kv_mib_per_rank']:.1f} "
                          f"| {', '.join(f'{m:.0f}' for m in r['rss_mib'])} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
