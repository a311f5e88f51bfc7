"""GPU benchmark: decode step time against the memory roofline, and throughput against HF generate().

    python benchmarks/gpu.py --tokenizer DIR [--streams 1,16,64,128,256] [--json out.json]

Model: a ~1B Llama shape (Llama-3.2-1B's layers: hidden 2048, 16 layers, 32 query / 8 KV heads,
head_dim 64, MLP 8192) with SmolLM2's 49152-token vocabulary and tokenizer (DIR holds its
tokenizer files), random bfloat16 weights: kvserve with --load-format dummy, transformers
initialised from the same config. Speed does not depend on the weights' values; every request
generates exactly --output-len tokens (EOS ignored).

1. Bandwidth: a large device-to-device copy (bytes read + written per second).
2. Roofline of one batch-1 decode step: bytes of weights read per step / that bandwidth.
3. Batch-1 decode step of kvserve: the whole engine step (schedule, inputs, model, sampling,
   detokenize), with CUDA graphs and eager, and the graph replay alone.
4. Throughput at each stream count: N requests at once through LLM.generate vs HF generate()
   as one static batch of N (prompts of equal length, no padding).
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import shutil
import statistics
import tempfile
import time

import torch

from engine import LLM, SamplingParams
from engine.core.config import EngineConfig
from engine.frontend.llm_engine import LLMEngine

SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, vocab_size=49152, max_position_embeddings=4096,
             tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=1, eos_token_id=2)


def model_dir(tokenizer_dir: str) -> str:
    from transformers import AutoTokenizer, LlamaConfig

    path = tempfile.mkdtemp(prefix="kvserve-1b-")
    LlamaConfig(**SHAPE).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 4 GiB device-to-device copy (median of 20)."""
    src = torch.randn(1 << 30, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(23):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * (4 << 30) / statistics.median(times[3:])


def weight_bytes() -> int:
    """Bytes a batch-1 decode step must read: every layer's weights and the (tied) LM head once."""
    h, i, layers, heads, kv, d, vocab = (SHAPE[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                            "num_attention_heads", "num_key_value_heads", "head_dim",
                                                            "vocab_size"))
    per_layer = h * (heads * d + 2 * kv * d) + heads * d * h + 3 * h * i + 2 * h
    return 2 * (layers * per_layer + vocab * h + h)  # bfloat16


def engine(path: str, eager: bool, max_num_seqs: int = 256) -> LLMEngine:
    return LLMEngine(EngineConfig(model=path, load_format="dummy", dtype="bfloat16", device="cuda",
                                  kv_cache_memory=8 << 30, max_num_seqs=max_num_seqs, enforce_eager=eager,
                                  max_num_batched_tokens=32768))


def decode_step_times(eng: LLMEngine, steps: int = 200) -> list[float]:
    """Seconds per engine step of one sequence (128-token prompt), prefill step left out."""
    eng.add_request("r", list(range(100, 228)), SamplingParams(temperature=0.0, max_tokens=steps + 1,
                                                               ignore_eos=True))
    eng.step()
    times = []
    while eng.has_unfinished_requests():
        start = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - start)
    return times[10:]


def replay_time(eng: LLMEngine, size: int = 1) -> float:
    """Seconds per replay of one batch size's graph alone (GPU time of a decode step's forward)."""
    graph, _ = eng.runner.graphs.graphs[size]
    for _ in range(10):
        graph.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(200):
        graph.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / 200


def profile_decode(path: str, n: int, steps: int = 20) -> dict:
    """Where a decode step of n streams spends its time: wall per step, GPU replay alone, and the
    functions with the most own time (cProfile), printed."""
    eng = engine(path, eager=False, max_num_seqs=n)
    for i, p in enumerate(prompts(n, 128)):
        eng.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=steps + 20, ignore_eos=True))
    while eng.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.running):
        eng.step()
    for _ in range(3):
        eng.step()
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    start = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        eng.step()
    prof.disable()
    wall = (time.perf_counter() - start) / steps
    replay = replay_time(eng, n)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
    print(f"decode step with {n} streams: {wall * 1e3:.2f} ms wall, graph replay {replay * 1e3:.2f} ms", flush=True)
    print("\n".join(text.getvalue().splitlines()[-30:]), flush=True)
    del eng
    return {"streams": n, "step_ms": wall * 1e3, "replay_ms": replay * 1e3}


def prompts(n: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return torch.randint(100, SHAPE["vocab_size"], (n, length), generator=g).tolist()


def kvserve_throughput(path: str, streams: list[int], input_len: int, output_len: int) -> tuple[dict[int, float], dict]:
    """(tok/s by streams, the default pool sizing's figures)."""
    # no pool size given: the default sizing (after the model and a warm-up at 32768 tokens) runs here
    llm = LLM(path, load_format="dummy", dtype="bfloat16", device="cuda", max_num_seqs=max(streams),
              max_num_batched_tokens=32768)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts(4, input_len), params)  # warm-up
    eng = llm.engine
    total = torch.cuda.mem_get_info()[1]
    peak, decode = eng.executor.measured_activations
    print(f"default pool: {eng.num_kv_blocks} blocks ({eng.num_kv_blocks * eng.config.block_size} tokens); "
          f"measured activations {peak / 2**30:.2f} GiB (decode batch {decode / 2**30:.2f} GiB); "
          f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated of {total / 2**30:.1f} GiB", flush=True)
    out = {}
    for n in streams:
        torch.cuda.synchronize()
        start = time.perf_counter()
        results = llm.generate(prompts(n, input_len), params)
        elapsed = time.perf_counter() - start
        out[n] = sum(len(r.outputs[0].token_ids) for r in results) / elapsed
        print(f"kvserve  streams={n:4d}  {out[n]:9.1f} tok/s", flush=True)
    reserved = torch.cuda.max_memory_reserved()
    print(f"peak reserved {reserved / 2**30:.1f} GiB = {reserved / total:.3f} of the device "
          f"(gpu_memory_utilization {eng.config.gpu_memory_utilization})", flush=True)
    pool = {"blocks": eng.num_kv_blocks, "activations_bytes": peak, "decode_activations_bytes": decode,
            "peak_reserved_fraction": reserved / total}
    del llm, eng
    return out, pool


def hf_throughput(path: str, streams: list[int], input_len: int, output_len: int) -> dict[int, float]:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").eval()
    out = {}

    def generate(n: int) -> float:
        ids = torch.tensor(prompts(n, input_len), device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=output_len,
                           min_new_tokens=output_len, pad_token_id=SHAPE["eos_token_id"])
        torch.cuda.synchronize()
        return n * output_len / (time.perf_counter() - start)

    generate(4)  # warm-up
    for n in streams:
        out[n] = generate(n)
        print(f"HF       streams={n:4d}  {out[n]:9.1f} tok/s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="a directory with SmolLM2's tokenizer files")
    ap.add_argument("--streams", default="1,16,64,128,256")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    path = model_dir(args.tokenizer)
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": SHAPE}
    res["copy_bandwidth_GBps"] = copy_bandwidth() / 1e9
    res["weight_bytes"] = weight_bytes()
    res["roofline_step_ms"] = res["weight_bytes"] / (res["copy_bandwidth_GBps"] * 1e9) * 1e3
    print(f"{res['device']}: copy {res['copy_bandwidth_GBps']:.0f} GB/s; batch-1 step reads "
          f"{res['weight_bytes'] / 1e9:.2f} GB -> roofline {res['roofline_step_ms']:.3f} ms", flush=True)
    for eager in (False, True):
        eng = engine(path, eager, max_num_seqs=8)
        times = decode_step_times(eng)
        key = "eager" if eager else "graphs"
        res[f"step_ms_{key}"] = statistics.median(times) * 1e3
        if not eager:
            res["replay_ms"] = replay_time(eng) * 1e3
        print(f"batch-1 engine step ({key}): median {res[f'step_ms_{key}']:.3f} ms", flush=True)
        del eng
        gc.collect()
        torch.cuda.empty_cache()
    print(f"batch-1 graph replay alone: {res['replay_ms']:.3f} ms = {res['replay_ms'] / res['roofline_step_ms']:.2f}x "
          f"roofline; engine step {res['step_ms_graphs'] / res['roofline_step_ms']:.2f}x", flush=True)
    res["profile"] = profile_decode(path, max(streams))
    gc.collect()
    torch.cuda.empty_cache()
    res["kvserve_tok_s"], res["default_pool"] = kvserve_throughput(path, streams, args.input_len, args.output_len)
    gc.collect()
    torch.cuda.empty_cache()
    if not args.skip_hf:
        res["hf_tok_s"] = hf_throughput(path, streams, args.input_len, args.output_len)
        print("\nstreams  kvserve tok/s  HF tok/s  ratio")
        for n in streams:
            print(f"{n:7d}  {res['kvserve_tok_s'][n]:13.1f}  {res['hf_tok_s'][n]:8.1f}  "
                  f"{res['kvserve_tok_s'][n] / res['hf_tok_s'][n]:5.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
