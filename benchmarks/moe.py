"""The MoE layer: tokens grouped per expert (engine/layers/moe.py) against transformers' per-expert
loop (its MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock: a one-hot mask, then a `where`, a
gather and an index_add per expert), on the same weights, by the number of tokens in the step.
Ours runs both ways: one torch grouped matmul over every expert's slice ("grouped_mm", the
default where it works), and a matmul per expert over its slice ("slices").

    python benchmarks/moe.py [--tokens 1,4,16,64,256,1024] [--repeats 9] [--json PATH]

Shapes: Mixtral-8x7B's routing (8 experts, top 2) and Qwen3-30B-A3B's (128 experts, top 8), each
with its hidden and expert sizes scaled down (H, I below) so that a layer fits a CPU benchmark;
float32. Each timing is the median of the repeats, the two alternating call by call; the
outputs are checked equal (within float32 rounding) before timing.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch

SHAPES = {
    # name: (transformers model_type, hidden, expert intermediate, experts, top k, renormalise)
    "mixtral-like E=8 k=2": ("mixtral", 1024, 3584, 8, 2, True),
    "qwen3-moe-like E=128 k=8": ("qwen3_moe", 512, 192, 128, 8, True),
}


def build(kind: str, hidden: int, inter: int, experts: int, k: int, renorm: bool):
    """(transformers' MoE block, ours with its weights)."""
    from transformers import AutoConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from engine.layers.moe import MoE

    extra = dict(num_local_experts=experts, intermediate_size=inter) if kind == "mixtral" else dict(
        num_experts=experts, moe_intermediate_size=inter, norm_topk_prob=renorm)
    cfg = AutoConfig.for_model(kind, hidden_size=hidden, num_experts_per_tok=k, **extra)
    torch.manual_seed(0)
    theirs = (MixtralSparseMoeBlock if kind == "mixtral" else Qwen3MoeSparseMoeBlock)(cfg).eval()
    for p in theirs.parameters():
        p.data.normal_(0.0, 0.05)
    ours = MoE(hidden, inter, experts, k, renorm)
    ours.gate.weight.data.copy_(theirs.gate.weight)
    ours.w13.data.copy_(theirs.experts.gate_up_proj)  # [E, 2I, H]: gate rows, then up rows, as ours
    ours.w2.data.copy_(theirs.experts.down_proj)
    return theirs, ours


def unbatched(block, x: torch.Tensor) -> torch.Tensor:
    """transformers' block takes [batch, seq, H]."""
    return block(x[None])


def run(moe, grouped: bool, x: torch.Tensor) -> torch.Tensor:
    moe.grouped_mm = grouped
    return moe(x)


def timed(fn, x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,4,16,64,256,1024")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    results = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32; median ms per layer call\n")
    for name, (kind, hidden, inter, experts, k, renorm) in SHAPES.items():
        theirs, ours = build(kind, hidden, inter, experts, k, renorm)
        print(f"### {name} (H={hidden}, I={inter})\n| tokens | per-expert loop (transformers) | slices (ours) "
              "| grouped_mm (ours) | loop / grouped_mm |\n|---|---|---|---|---|")
        ways = {"loop": functools.partial(unbatched, theirs), "slices": functools.partial(run, ours, False),
                "grouped_mm": functools.partial(run, ours, True)}
        for t in (int(v) for v in args.tokens.split(",")):
            x = torch.randn(t, hidden) * 0.5
            want = unbatched(theirs, x).reshape(t, hidden)
            for grouped in (False, True):
                torch.testing.assert_close(run(ours, grouped, x), want, rtol=1e-4, atol=1e-5)
            times = {way: [] for way in ways}
            for _ in range(args.repeats):
                for way, fn in ways.items():
                    times[way].append(timed(fn, x))
            ms = {way: 1000 * statistics.median(v) for way, v in times.items()}
            results.setdefault(name, {})[t] = ms
            print(f"| {t} | {ms['loop']:.2f} | {ms['slices']:.2f} | {ms['grouped_mm']:.2f} "
                  f"| {ms['loop'] / ms['grouped_mm']:.2f}x |", flush=True)
        print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
