"""CPU kernel choices behind the fast path, timed alone on SmolLM2-135M's shapes.

    python benchmarks/cpu_kernels.py [--json out.json]

1. Linear layers: the 121 linears of one decode step (30 layers x qkv, o, gate_up, down, plus
   the LM head) at 1, 16 and 64 rows, per kernel: float32 and bfloat16 weights packed by oneDNN
   (what the engine uses), and PyTorch's int8 weight-only kernel with float32 or bfloat16
   activations. Each shape is timed alone, so a layer's small matrix stays in the CPU cache and
   only the 113 MB LM head comes from DRAM: the sums are lower bounds for a real step.
2. The same linears as a decode step runs them: 30 layers of distinct weights in order (540 MB in
   float32, so they stream from DRAM as in the engine), at 1-4 rows: oneDNN packed against the
   C++ skinny kernel (engine/kernels/cpu.cpp), float32 and bfloat16.
3. Decode attention for one layer: the eager gather + SDPA (engine/layers/attention.py) against the
   C++ paged kernel (engine/kernels/cpu.cpp), float32 and bfloat16, over 30 layers' pools in
   turn so the cache is read from DRAM as in a step.
4. The element-wise pieces of a step (30 layers x RMSNorm, add + RMSNorm, RoPE, SiLU-and-multiply)
   at 1, 32 and 256 rows: eager (engine/models/llama.py) against the C++ kernels.
5. Whole decode steps of the engine on the bundled model at batch 1 and 32, eager against C++
   element-wise pieces, alternated every 8 steps in one process (so drift and the sequences'
   growing context hit both alike).
6. gguf: the linears of one step on the bundled GGUF's own blocks (engine/layers/gguf_linear.py)
   against oneDNN packed and the C++ skinny kernel on the same float32 weights, 1-256 rows,
   interleaved.
7. gguf_steps: whole decode steps at batch 1, 16 and 32, linears on the GGUF blocks against
   oneDNN + skinny, alternated in one engine as in 5.
7b. gguf_isa: the GGUF-block kernel built for AVX-512 and AVX2 (each where the CPU runs it) against
   torch.mm on the same float32 weights, GFLOP/s at 1-256 rows: the AVX2 path measured on an
   AVX-512 machine too.

8. history: prefill attention of a 2048-token chunk after a cached history (a long prompt's later
   chunks), SmolLM2's 9 query / 3 key-value heads x 30 layers, float32: the masked SDPA against the
   history attended unmasked and the chunk causally, merged (engine/layers/attention.py), interleaved.

    python benchmarks/cpu_kernels.py --parts streamed,attention   # only the second and third

--baseline-rev REV adds the kernels of engine/kernels/cpu.cpp as it was at git revision REV to
parts 3, 6 and 7, built beside the current ones under another op namespace and timed in turn with
them, so a change to a kernel is measured before and after in one process:

    python benchmarks/cpu_kernels.py --parts gguf,gguf_steps --baseline-rev 0081caa
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from engine import platform
from engine.kernels import cpu
from engine.layers.attention import decode_reference, prefill_after_history, prefill_masked
from engine.layers.packed_linear import PackedLinear, onednn_available

ROOT = Path(__file__).resolve().parent.parent

# (out, in) and how many a step runs
LINEARS = {"qkv": ((960, 576), 30), "o": ((576, 576), 30), "gate_up": ((3072, 576), 30),
           "down": ((576, 1536), 30), "lm_head": ((49152, 576), 1)}


def median_ms(fn, reps: int = 20) -> float:
    start = time.perf_counter()
    fn()
    if time.perf_counter() - start > 0.05:  # a slow kernel: fewer repeats
        reps = 3
    else:
        fn(), fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def linear_kernels(w: torch.Tensor) -> dict:
    """name -> (function of x [M, in], the dtype x must have) for the weight w [out, in]."""
    scale = w.abs().amax(1) / 127
    w8 = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    kernels = {"float32 packed": (_packed(w, torch.float32), torch.float32),
               "int8 weight-only, fp32 act": (
                   lambda x: torch.ops.aten._weight_int8pack_mm(x, w8, scale), torch.float32),
               "int8 weight-only, bf16 act": (
                   lambda x: torch.ops.aten._weight_int8pack_mm(x, w8, scale.bfloat16()), torch.bfloat16)}
    if onednn_available(torch.bfloat16):
        kernels["bfloat16 packed"] = (_packed(w, torch.bfloat16), torch.bfloat16)
    return kernels


def _packed(w: torch.Tensor, dtype: torch.dtype) -> PackedLinear:
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w.to(dtype)
    return PackedLinear(linear)


def bench_linears() -> dict:
    totals: dict[str, dict[int, float]] = {}
    for rows in (1, 16, 64):
        for (shape, count) in LINEARS.values():
            w = torch.randn(shape) * 0.05
            for name, (fn, dtype) in linear_kernels(w).items():
                x = torch.randn(rows, shape[1]).to(dtype)
                totals.setdefault(name, {})[rows] = totals.get(name, {}).get(rows, 0.0) + count * median_ms(
                    lambda: fn(x))
    for name, by_rows in totals.items():
        print(f"linears, {name}: " + ", ".join(f"{r} rows {ms:.1f} ms" for r, ms in by_rows.items()), flush=True)
    return totals


def bench_linears_streamed() -> dict:
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        if not (onednn_available(dtype) and platform.cpp_kernels_available(dtype)):
            continue
        packed = [PackedLinear(torch.nn.Linear(shape[1], shape[0], bias=False).to(dtype), skinny=True)
                  for shape, count in LINEARS.values() for _ in range(count)]  # shape: (out, in)
        for rows in (1, 2, 3, 4):
            xs = {k: torch.randn(rows, k).to(dtype) for k in {m.in_features for m in packed}}
            with torch.inference_mode():
                onednn = median_ms(lambda: [torch.ops.mkldnn._linear_pointwise(
                    xs[m.in_features], m.packed, None, "none", [], "") for m in packed], reps=10)
                skinny = median_ms(lambda: [cpu.skinny_linear(xs[m.in_features], m.weight, None) for m in packed],
                                   reps=10)
            key = f"{str(dtype).removeprefix('torch.')} {rows} rows"
            results[key] = {"oneDNN packed": onednn, "C++ skinny": skinny}
            print(f"linears of one step, streamed, {key}: oneDNN packed {onednn:.1f} ms, C++ skinny {skinny:.1f} ms",
                  flush=True)
    return results


def bench_attention(layers: int = 30, baseline=None) -> dict:
    """Per layer, timed over `layers` distinct pools in turn as a step reads them: the KV cache
    comes from DRAM, as in the engine, not from the CPU cache that one small pool would fit in.
    The kernels take turns (with a baseline, its paged_decode too)."""
    heads, kv_heads, head_dim, bs = 9, 3, 64, 16
    results = {}
    built = platform.cpp_kernels_available(torch.float32) and platform.cpp_kernels_available(torch.bfloat16)
    for dtype in (torch.float32, torch.bfloat16):
        for batch, ctx in ((1, 80), (1, 1000), (16, 180), (64, 180), (64, 400)):
            width = -(-ctx // bs)
            num_blocks = 2 * batch * width  # half of the pool unused: the blocks of a sequence lie scattered
            with torch.inference_mode():
                step = [(torch.randn(batch, heads, head_dim).to(dtype),
                         torch.randn(2, num_blocks, bs, kv_heads, head_dim).to(dtype),
                         torch.randperm(num_blocks)[:batch * width].view(batch, width)) for _ in range(layers)]
                lens = torch.full((batch,), ctx)
                mask = (torch.arange(width * bs)[None, :] < lens[:, None])[:, None, None, :]
                scale = head_dim ** -0.5
                kernels = {"eager gather + SDPA": lambda: [decode_reference(q, kv, tables, mask, scale)
                                                           for q, kv, tables in step]}
                if built:
                    kernels["C++ paged"] = lambda: [cpu.paged_decode(q, kv, tables, lens, scale)
                                                    for q, kv, tables in step]
                if built and baseline:
                    kernels["C++ paged, baseline"] = lambda: [
                        baseline.paged_decode(q, kv[0], kv[1], tables, lens, scale) for q, kv, tables in step]
                row = {name: ms / layers for name, ms in _interleaved(kernels, 7).items()}
            key = f"{str(dtype).removeprefix('torch.')} batch {batch} x {ctx} tokens"
            results[key] = row
            print(f"decode attention, one layer, {key}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in row.items()),
                  flush=True)
    return results


def bench_elementwise() -> dict:
    from engine.layers.ops import Ops

    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (1, 32, 256):
            h, w = torch.randn(rows, 576).to(dtype), torch.rand(576).to(dtype)
            qkv, gate_up = torch.randn(rows, 960).to(dtype), torch.randn(rows, 3072).to(dtype)
            cos, sin = torch.randn(rows, 1, 64).to(dtype), torch.randn(rows, 1, 64).to(dtype)
            row = {}
            for kind in ("eager", "cpp"):
                ops = Ops(kind)

                def step():
                    for _ in range(30):
                        ops.rms_norm(h, w, 1e-5), ops.add_rms_norm(h, h, w, 1e-5)
                        ops.rope_qkv(qkv, cos, sin, 9, 3, 64), ops.silu_mul(gate_up)
                with torch.inference_mode():
                    row[kind] = median_ms(step)
            key = f"{str(dtype).removeprefix('torch.')} {rows} rows"
            results[key] = row
            print(f"element-wise pieces of one step, {key}: eager {row['eager']:.2f} ms, C++ {row['cpp']:.2f} ms",
                  flush=True)
    return results


def _interleaved(kinds: dict, reps: int) -> dict[str, float]:
    """Median ms of each function (name -> fn), the kinds taking turns so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(reps):
        for name, fn in kinds.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def _decoding_engine(model_dir: str, batch: int):
    """An engine on the bundled model with `batch` sequences past their prefill, decoding."""
    from engine import LLM, SamplingParams

    llm = LLM(model_dir, max_num_seqs=64)
    ids = llm.get_tokenizer().encode("A river runs through the valley, past orchards and old stone mills. " * 8)[:63]
    for i in range(batch):
        llm.engine.add_request(str(i), [i + 5] + ids, SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True))
    llm.engine.step()  # the prefills
    return llm


def _alternate(engine, setups: dict, rounds: int) -> dict[str, float]:
    """Median step time (ms) under each setup (name -> function applying it), switching every 8
    steps so drift and the sequences' growing context hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(rounds):
        for name, apply in setups.items():
            apply()
            for _ in range(8):
                start = time.perf_counter()
                engine.step()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


def bench_steps(rounds: int = 12) -> dict:
    from engine import bundled_model_dir

    results = {}
    for batch in (1, 32):
        llm = _decoding_engine(str(bundled_model_dir()), batch)
        model = llm.engine.runner.model
        row = results[f"batch {batch}"] = _alternate(llm.engine, {kind: functools.partial(model.use_ops, kind)
                                                                  for kind in ("eager", "cpp")}, rounds)
        print(f"decode step, batch {batch}, element-wise pieces eager {row['eager']:.1f} ms, C++ {row['cpp']:.1f} ms",
              flush=True)
        del llm
    return results


def baseline_kernels(rev: str):
    """The kernels of engine/kernels/cpu.cpp as it was at git revision rev: that source, its ops
    renamed to the namespace kvserve_base, built with the current flags and loaded beside ours;
    -> torch.ops.kvserve_base."""
    show = subprocess.run(["git", "show", f"{rev}:engine/kernels/cpu.cpp"], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    if show.returncode != 0:
        raise SystemExit(f"--baseline-rev {rev}: {show.stderr.strip()}")
    source, renamed = re.subn(r"TORCH_LIBRARY(_IMPL)?\(kvserve\b", r"TORCH_LIBRARY\1(kvserve_base", show.stdout)
    if renamed != 2:
        raise SystemExit(f"cpu.cpp at {rev}: expected one TORCH_LIBRARY and one TORCH_LIBRARY_IMPL, found {renamed}")
    with tempfile.TemporaryDirectory(prefix="kvserve-baseline-") as tmp:  # loaded, the library needs no file
        build = Path(tmp)
        (build / "cpu.cpp").write_text(source)
        for header in cpu.HEADERS:  # the revision's own, where it had them
            theirs = subprocess.run(["git", "show", f"{rev}:engine/kernels/{header.name}"], cwd=ROOT,
                                    capture_output=True, text=True, check=False)
            if theirs.returncode == 0:
                (build / header.name).write_text(theirs.stdout)
        run = subprocess.run(cpu._compile_command(build / "cpu.so", build / "cpu.cpp"), capture_output=True, text=True,
                             check=False)
        if run.returncode != 0:
            raise SystemExit(f"building cpu.cpp of {rev} failed: {run.stderr.strip()[-2000:]}")
        torch.ops.load_library(str(build / "cpu.so"))
    return torch.ops.kvserve_base


def _baseline_gguf_linear(baseline, modules: list):
    """The baseline's gguf_linear with cpu.gguf_linear's signature, once its results agree with
    ours: the blocks are packed by today's engine/layers/gguf_linear.py, and a kernel that read
    another layout would be timed on garbage."""
    if not hasattr(baseline, "gguf_linear"):
        raise SystemExit("the baseline's cpu.cpp has no gguf_linear")

    # a baseline from before the scales were kept as float16 (issue 37) takes them as float32
    x = torch.randn(1, modules[0].in_features)
    try:
        baseline.gguf_linear(x, modules[0].q, modules[0].scales, modules[0].out_features, None)
        wide = None
    except RuntimeError:
        wide = {id(m.scales): m.scales.float() for m in modules}

    def gguf_linear(x, q, scales, out_features, bias):
        scales = scales if wide is None else wide[id(scales)]
        return baseline.gguf_linear(x.contiguous(), q, scales, out_features, bias)
    for m in modules[:4]:
        x = torch.randn(5, m.in_features)
        ours, theirs = m(x), gguf_linear(x, m.q, m.scales, m.out_features, None)
        if not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4):
            raise SystemExit("the baseline's gguf_linear disagrees with the current one (max abs diff "
                             f"{(ours - theirs).abs().max():.3g}): the block layout changed between the two")
    return gguf_linear


def _gguf_step_linears() -> list:
    """The bundled model's linears of one step as GGUF blocks, fused as the engine fuses them."""
    from engine.layers.gguf_linear import Blocks, read_gguf_blocks
    from engine.models.loader import bundled_gguf_path

    blocks = read_gguf_blocks(bundled_gguf_path())
    step = []
    for i in range(30):
        for parts in (("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"), ("ffn_down",)):
            step.append(Blocks.cat([blocks[f"blk.{i}.{p}.weight"] for p in parts]))
    return step + [blocks["token_embd.weight"]]


def bench_gguf_linears(reps: int = 7, baseline=None) -> dict:
    from engine.layers.gguf_linear import GGUFLinear

    if not platform.cpp_kernels_available():
        print("C++ kernels unavailable: no GGUF linears to time", flush=True)
        return {}
    step = _gguf_step_linears()
    gguf = [GGUFLinear(b, None) for b in step]
    packed = []
    for b in step:
        linear = torch.nn.Linear(b.q.shape[1], b.q.shape[0], bias=False)
        linear.weight.data = b.dequantize()  # the float32 weights the engine computes with
        packed.append(PackedLinear(linear, skinny=True))
    kernels = {"GGUF blocks": lambda xs: [m(xs[m.in_features]) for m in gguf],
               "oneDNN packed": lambda xs: [torch.ops.mkldnn._linear_pointwise(
                   xs[m.in_features], m.packed, None, "none", [], "") for m in packed],
               "C++ skinny": lambda xs: [cpu.skinny_linear(xs[m.in_features], m.weight, None) for m in packed]}
    if baseline:
        theirs = _baseline_gguf_linear(baseline, gguf)
        kernels["GGUF blocks, baseline"] = lambda xs: [
            theirs(xs[m.in_features], m.q, m.scales, m.out_features, None) for m in gguf]
    results = {}
    for rows in (1, 2, 4, 8, 16, 32, 64, 256):
        xs = {k: torch.randn(rows, k) for k in {m.in_features for m in gguf}}
        timed = {n: functools.partial(fn, xs) for n, fn in kernels.items() if n != "C++ skinny" or rows <= 2}
        with torch.inference_mode():
            row = results[f"{rows} rows"] = _interleaved(timed, reps)
        print(f"linears of one step, float32 weights of the bundled GGUF, {rows} rows: "
              + ", ".join(f"{n} {ms:.1f} ms" for n, ms in row.items()), flush=True)
    return results


def bench_gguf_steps(rounds: int = 10, baseline=None) -> dict:
    """Whole decode steps, linears on the GGUF blocks against oneDNN + C++ skinny on the same
    float32 weights (the path a plain HF directory of the model takes), alternated in one engine;
    with a baseline, also the GGUF blocks through the baseline's kernel."""
    from engine import LLM
    from engine.layers.gguf_linear import GGUFLinear
    from engine.models.loader import GGUF_ORIGIN_FILE, bundled_model_dir

    results, current = {}, cpu.gguf_linear
    with tempfile.TemporaryDirectory() as plain:
        for f in bundled_model_dir().iterdir():  # the same model as a plain HF directory
            if f.name != GGUF_ORIGIN_FILE:
                (Path(plain) / f.name).symlink_to(f)
        other = dict(LLM(plain, num_kv_blocks=8).engine.runner.model.named_modules())
        for batch in (1, 16, 32):
            llm = _decoding_engine(str(bundled_model_dir()), batch)
            model = llm.engine.runner.model
            ours = {name: m for name, m in model.named_modules() if isinstance(m, GGUFLinear)}

            def use(modules: dict, kernel=current) -> None:
                for name in ours:
                    model.set_submodule(name, modules[name])
                cpu.gguf_linear = kernel  # what GGUFLinear.forward calls
            setups = {"onednn+cpp": lambda: use(other), "gguf": lambda: use(ours)}
            if baseline:
                theirs = _baseline_gguf_linear(baseline, list(ours.values()))
                setups["gguf, baseline"] = lambda: use(ours, theirs)
            row = results[f"batch {batch}"] = _alternate(llm.engine, setups, rounds)
            use(ours)
            print(f"decode step, batch {batch}, linears " + ", ".join(f"{n} {ms:.1f} ms" for n, ms in row.items()),
                  flush=True)
            del llm
    return results


def bench_history(n: int = 2048, layers: int = 30, reps: int = 3) -> dict:
    """Prefill attention of an n-token chunk after a cached history, `layers` times."""
    results = {}
    for history in (512, 1952, 4096, 6144):
        ctx = history + n
        k, v = torch.randn(ctx, 3, 64), torch.randn(ctx, 3, 64)
        qs = torch.randn(1, 9, n, 64)
        kinds = {"masked SDPA": lambda: prefill_masked(qs, k, v, 0.125),
                 "split + merge": lambda: prefill_after_history(qs, k[:history], v[:history], k[history:],
                                                                 v[history:], 0.125)}
        row = results[f"{n} after {history}"] = _interleaved(
            {name: lambda fn=fn: [fn() for _ in range(layers)] for name, fn in kinds.items()}, reps)
        print(f"prefill attention, {n} tokens after {history}, {layers} layers: "
              + ", ".join(f"{name} {ms:.0f} ms" for name, ms in row.items()), flush=True)
    return results

def bench_gguf_isa(reps: int = 7) -> dict:
    """The GGUF-block kernel built for each instruction set this CPU runs (engine/kernels/
    gguf_check.cpp: AVX-512, AVX2), all of one step's linears at 1-256 rows, against torch.mm on the
    same float32 weights (streamed from DRAM as the kernel's blocks are), in GFLOP/s, interleaved:
    on an AVX-512 machine this is how the AVX2 path (laptops, Zen 2/3) fares against the sgemm of
    the machine it runs on. torch.mm runs on all of this CPU's vector width whichever build it
    faces; pin MKL to AVX2 (MKL_ENABLE_INSTRUCTIONS=AVX2) to compare like with like."""
    from engine.layers.gguf_linear import GGUFLinear

    names = {"x86-64-v4": "AVX-512", "x86-64-v3": "AVX2"}
    builds = {names[march]: cpu.GGUFCheck(march) for march in cpu.runnable_isas() if march in names}
    step = _gguf_step_linears()
    gguf = [GGUFLinear(b, None) for b in step]
    dense = [b.dequantize() for b in step]  # 540 MB: read from DRAM a pass, as in a step
    results = {}
    for rows in (1, 4, 16, 32, 64, 256):
        xs = {k: torch.randn(rows, k) for k in {m.in_features for m in gguf}}
        flop = sum(2 * rows * m.in_features * m.out_features for m in gguf)
        kinds = {name: lambda b=b: [b.linear(xs[m.in_features], m.q, m.scales, m.out_features, None) for m in gguf]
                 for name, b in builds.items()}
        kinds["torch.mm"] = lambda: [torch.mm(xs[w.shape[1]], w.t()) for w in dense]
        with torch.inference_mode():
            ms = _interleaved(kinds, reps)
        row = results[f"{rows} rows"] = {name: round(flop / t / 1e6, 1) for name, t in ms.items()}
        mm = row["torch.mm"]
        print(f"GGUF-block linears of one step, {rows} rows, GFLOP/s: " + ", ".join(
            f"{n} {g}" + ("" if n == "torch.mm" else f" ({g / mm:.2f}x torch.mm)") for n, g in row.items()), flush=True)
    return results


# --parts name -> (its key in the JSON, the function that measures it), in the order they run
PARTS = {"linears": ("linears_ms_per_step", bench_linears),
         "streamed": ("streamed_linears_ms_per_step", bench_linears_streamed),
         "attention": ("decode_attention_ms_per_layer", bench_attention),
         "elementwise": ("elementwise_ms_per_step", bench_elementwise),
         "steps": ("decode_step_ms_elementwise_eager_vs_cpp", bench_steps),
         "gguf": ("gguf_linears_ms_per_step", bench_gguf_linears),
         "gguf_steps": ("decode_step_ms_linears_onednn_vs_gguf", bench_gguf_steps),
         "gguf_isa": ("gguf_linears_gflops_by_isa", bench_gguf_isa),
         "history": ("prefill_attention_ms_after_history", bench_history)}

BASELINE_PARTS = ("attention", "gguf", "gguf_steps")  # those that time --baseline-rev's kernels too


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    ap.add_argument("--baseline-rev", default=None, metavar="REV",
                    help="also time the kernels of cpu.cpp at this git revision (parts attention, gguf, gguf_steps)")
    args = ap.parse_args()
    parts = args.parts.split(",")
    torch.manual_seed(0)
    platform.cpp_kernels_available()  # loads the kernel library (registers torch.ops.kvserve.*) whichever parts run
    result = {"threads": torch.get_num_threads()}
    baseline = None
    if args.baseline_rev and platform.cpp_kernels_available():
        baseline = baseline_kernels(args.baseline_rev)
        result["baseline_rev"] = args.baseline_rev
    for part, (key, bench) in PARTS.items():
        if part in parts:
            result[key] = bench(baseline=baseline) if part in BASELINE_PARTS else bench()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)

if __name__ == "__main__":
    main()
