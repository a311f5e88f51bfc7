"""Which kernels run, decided once per engine from the config and the machine.

The loader, the runner and the engine ask the `Backends` chosen here; nothing else probes the
machine. The C++ CPU kernels are used only where they build, load and agree with the eager
references (engine/layers/) on a small self-test, once per dtype; where they do not, a warning
says why and the eager paths run.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass

import torch

from engine.kernels import cpu
from engine.layers import ops
from engine.layers.attention import decode_reference
from engine.layers.gguf_linear import Blocks, GGUFLinear
from engine.layers.packed_linear import PackedLinear, onednn_available

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backends:
    packed_linears: bool  # CPU linears on oneDNN pre-packed weights
    skinny_linears: bool  # ... and the C++ kernel for steps of 1-2 rows beside them
    gguf_linears: bool  # layers converted from a GGUF file multiply with its blocks where exact
    elementwise: str  # "eager" | "cpp" | "compiled" (ops.Ops kinds)
    attention: str  # decode attention: "torch" (the reference) | "cpp" | "triton"
    cuda_graphs: bool  # decode steps replayed from captured CUDA graphs
    grouped_mm: bool  # MoE experts in one torch grouped matmul (else a matmul per expert)
    fused_decode: bool = False  # CPU decode steps of all layers in one C++ call, where the model allows


def choose(config, device: torch.device, dtype: torch.dtype, attn_shape: tuple[int, int, int],
           from_gguf: bool) -> Backends:
    """attn_shape: (query heads, KV heads, head_dim). ValueError where an explicit choice cannot run here."""
    cpu_kernels = device.type == "cpu" and not config.enforce_eager and cpp_kernels_available(dtype)
    packable = device.type == "cpu" and onednn_available(dtype)
    linear = config.linear_backend
    if linear == "onednn" and not packable:
        raise ValueError("linear_backend: 'onednn' needs a CPU with oneDNN and float32 (or bfloat16 where the CPU "
                         "has native bf16 dot products)")
    attention = _decode_attention(config, device, dtype, attn_shape)
    compiled = device.type == "cuda" and not config.enforce_eager
    return Backends(
        packed_linears=linear != "torch" and packable,
        skinny_linears=linear == "auto" and packable and cpu_kernels,
        gguf_linears=(linear == "auto" and cpu_kernels and dtype == torch.float32 and from_gguf
                      and config.load_format != "dummy"),
        elementwise="cpp" if cpu_kernels else "compiled" if compiled else "eager",
        attention=attention,
        cuda_graphs=compiled and attention == "triton",
        grouped_mm=grouped_mm_available(device.type, dtype),
        fused_decode=cpu_kernels and attention == "cpp")


def _decode_attention(config, device: torch.device, dtype: torch.dtype, attn_shape: tuple[int, int, int]) -> str:
    """"auto": the Triton kernel on CUDA, the C++ one on CPU, each where it can; else the reference."""
    backend = config.attention_backend
    if backend == "torch":
        return "torch"
    if device.type == "cuda":
        triton = importlib.util.find_spec("triton") is not None
        if triton:
            from engine.kernels.paged_decode import supports

            triton = supports(*attn_shape, config.block_size)
        if backend == "triton" and not triton:
            raise ValueError("attention_backend: 'triton' needs CUDA, the triton package, a power-of-two head_dim "
                             "and block_size")
        if backend == "cpp":
            raise ValueError("attention_backend: 'cpp' is the CPU kernel; use 'triton' or 'auto' on CUDA")
        return "triton" if triton else "torch"
    if backend == "triton":
        raise ValueError("attention_backend: 'triton' needs CUDA")
    if backend == "auto" and config.enforce_eager:
        return "torch"
    built = cpp_kernels_available(dtype)
    if backend == "cpp" and not built:
        raise ValueError("attention_backend: 'cpp' needs a working C++ compiler to build the CPU kernel; "
                         "see the warning above")
    return "cpp" if built else "torch"


@functools.cache
def grouped_mm_available(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch's grouped matmul runs here and agrees with one matmul per group (empty groups
    included): torch builds differ in the devices, compute capabilities and dtypes it supports."""
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None)
    if grouped_mm is None:
        return False
    try:
        x, w = torch.rand(9, 16, dtype=dtype, device=device_type), torch.rand(3, 16, 8, dtype=dtype, device=device_type)
        ends = torch.tensor([4, 4, 9], dtype=torch.int32, device=device_type)  # the middle group is empty
        want = torch.cat([x[:4] @ w[0], x[4:] @ w[2]])
        torch.testing.assert_close(grouped_mm(x, w, offs=ends), want)
        return True
    except (RuntimeError, NotImplementedError, AssertionError) as e:
        log.info("torch grouped_mm unavailable on %s/%s (%s); MoE layers loop over their experts",
                 device_type, dtype, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False


def cpp_kernels_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the C++ CPU kernels build, load and agree with the eager references here."""
    return _probe(dtype)  # (a cache here would tell a call without dtype from one with float32)


@functools.cache
def _probe(dtype: torch.dtype) -> bool:
    try:
        cpu.load()
        kv = torch.rand(2, 7, 4, 3, 8, dtype=dtype)  # 7 blocks of 4 slots, 3 KV heads, head_dim 8
        q = torch.rand(5, 6, 8, dtype=dtype)  # 5 sequences, 6 query heads
        tables, lens = torch.randint(0, 7, (5, 9)), torch.tensor([17, 3, 36, 1, 30])
        mask = (torch.arange(36)[None, :] < lens[:, None])[:, None, None, :]
        want = decode_reference(q.float(), kv.float(), tables, mask, 0.5).to(dtype)
        torch.testing.assert_close(cpu.paged_decode(q, kv, tables, lens, 0.5), want)
        x, w, b = torch.rand(3, 40, dtype=dtype), torch.rand(24, 40, dtype=dtype), torch.rand(24, dtype=dtype)
        want = torch.nn.functional.linear(x.float(), w.float(), b.float()).to(dtype)
        torch.testing.assert_close(cpu.skinny_linear(x, w, b), want)
        _probe_elementwise(dtype)
        if dtype == torch.float32:
            _probe_gguf()
        return True
    except Exception as e:  # noqa: BLE001 - no compiler, no headers, a broken toolchain: the eager paths still work
        log.warning("C++ CPU kernels unavailable (%s: %s); using the eager paths",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return False


def _probe_gguf() -> None:
    x = torch.rand(300, 64)  # every path of the kernel: 1 row (few), 13 rows (many), 300 rows (a prefill's)
    for m in (torch.rand(40, 2).half().float(), None):  # 4-bit with minimums, 8-bit (scales: float16s)
        q = torch.randint(0, 16, (40, 64), dtype=torch.uint8) if m is not None else torch.randint(
            -128, 128, (40, 64), dtype=torch.int8)
        blocks = Blocks(q, torch.rand(40, 2).half().float(), m)
        w = blocks.dequantize().double()
        for rows in (x, x[:13], x[:1]):
            error = (cpu.gguf_linear(rows, *blocks.pack(), 40, None) - rows.double() @ w.T).abs()
            if not (error <= 1e-6 * (rows.double() @ w.abs().T)).all():  # float32 sums of positive terms
                raise AssertionError(f"gguf_linear disagrees with float64 by up to {error.max():.3g}")


def _probe_elementwise(dtype: torch.dtype) -> None:
    h, delta, w = torch.rand(3, 40, dtype=dtype), torch.rand(3, 40, dtype=dtype), torch.rand(40, dtype=dtype)
    torch.testing.assert_close(cpu.add_rms_norm(h, delta, w, 1e-5), ops.add_rms_norm(h, delta, w, 1e-5))
    qkv, cos, sin = torch.rand(3, 64, dtype=dtype), torch.rand(3, 1, 8, dtype=dtype), torch.rand(3, 1, 8, dtype=dtype)
    torch.testing.assert_close(cpu.rope_qkv(qkv, cos, sin, 4, 2, 8), ops.rope_qkv(qkv, cos, sin, 4, 2, 8))
    torch.testing.assert_close(cpu.silu_mul(qkv), ops.silu_mul(qkv))


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but no CUDA device is available")
    return torch.device(device)


def pick_dtype(dtype: str, hf_config, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cpu":
        return torch.float32  # CPU half-precision matmuls are slow without AVX-512
    native = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(native, str):
        native = getattr(torch, native, None)
    return native if native in (torch.bfloat16, torch.float16) else torch.bfloat16


def linear_kinds(model) -> str:
    """The linear layers' kinds, e.g. "gguf" (all GGUF blocks), "onednn+cpp", "gguf,onednn"."""
    def kind(m) -> str | None:
        if isinstance(m, GGUFLinear):
            return "gguf"
        if isinstance(m, PackedLinear):
            return "onednn+cpp" if m.weight is not None else "onednn"
        return "torch" if isinstance(m, torch.nn.Linear) else None

    return ",".join(sorted({k for k in map(kind, model.modules()) if k}))
