"""CPU kernels in C++ (cpu.cpp), built here at first use: paged decode attention, a linear layer
for a few rows, a linear layer on GGUF blocks, and a layer's element-wise pieces (RMSNorm, RoPE,
SiLU-and-multiply). Measurements of each against the eager path are in BENCHMARKS.md
(benchmarks/cpu_kernels.py).

Decode attention: eager PyTorch has to gather every sequence's blocks into a dense copy before
attending (engine/layers/attention.py `decode_reference`): the cache is read, the copy written,
and the copy read again. The kernel reads each sequence's blocks in place, all heads of a token in
one contiguous run, fetching the next block ahead; with fewer sequences than threads, each is cut
into stretches merged at the end.

Skinny linear: at a row or two a linear layer is a pass over its weight, and one plain loop per
weight row, the rows split between threads, streams it faster than oneDNN's packed kernels
(engine/layers/packed_linear.py picks by row count).

GGUF linear (gguf_matmul.h): float32 activations times a weight kept in its GGUF blocks (Q4_0,
Q4_1, Q8_0), rebuilt to exactly the float32 values and multiplied in float32. With few rows each
weight is rebuilt in registers and used there; with more, each block is rebuilt once into L1 and
multiplied by tiles of rows (12 x 32 outputs on AVX-512, 6 x 16 on AVX2), the next blocks fetched
into L2 meanwhile. engine/layers/gguf_linear.py decides where it applies.

Decode layers: a whole decode step of plain Llama layers on GGUF-block linears in one call, the
kernels above in the order the layers call them, without Python between them (engine/models/
llama.py use_fused_decode says where).

Element-wise pieces (engine/layers/ops.py Ops "cpp"): each one pass over its rows where eager
PyTorch runs five to ten kernels and allocates between them; they round to the model dtype where
the eager code does.

The library is compiled once per source, torch version and CPU (`-march=native`) into the
kvserve cache directory and loaded from there afterwards. engine/platform.py checks it against
the eager references before the engine uses it, and stays on the eager paths where it cannot.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

from engine.paths import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu.cpp")
HEADERS = [Path(__file__).with_name("gguf_matmul.h")]
# gguf_matmul.h alone, without torch (engine/kernels/gguf_check.cpp): built for a chosen instruction set
GGUF_CHECK = Path(__file__).with_name("gguf_check.cpp")
# Floating-point reassociation: without it the compiler ends every vectorised dot product with 16
# scalar adds in lane order (a third of bf16 decode attention's time; the kernels are tested
# against float64 references with tolerances, not bitwise).
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC",
         "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]


def _cpu_fingerprint() -> str:
    """The CPU model and feature flags: a library built with -march=native is only valid on them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(next((ln for ln in lines if ln.startswith(key)), "") for key in ("model name", "flags"))
    except OSError:
        return platform.processor()


def _compile_command(out: Path, source: Path = SOURCE) -> list[str]:
    # torch's own headers and libraries (not torch.utils.cpp_extension: it needs setuptools at run time)
    torch_dir = Path(torch.__file__).parent
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    return [os.environ.get("CXX", "c++"), *FLAGS, abi, f"-I{torch_dir / 'include'}", str(source), "-o", str(out),
            f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu"]


def _built(name: str, command, *keys: str | bytes) -> Path:
    """The library `command(out)` builds, kept in the cache directory under a key of `keys` and the
    sources; built beside the target and renamed, so a second process building at once never loads
    half a file."""
    key = hashlib.sha256(b"\0".join(s.encode() if isinstance(s, str) else s for s in (
        SOURCE.read_bytes(), GGUF_CHECK.read_bytes(), *(h.read_bytes() for h in HEADERS), torch.__version__,
        os.environ.get("CXX", "c++"), _cpu_fingerprint(), *keys))).hexdigest()[:16]
    path = cache_root() / "kernels" / f"{name}-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            run = subprocess.run(command(Path(tmp)), capture_output=True, text=True, check=False)
            if run.returncode != 0:
                raise RuntimeError(f"building {name} failed: {run.stderr.strip()[-2000:]}")
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return path


def _library() -> Path:
    return _built("cpu", _compile_command, " ".join(FLAGS))


@functools.cache
def load() -> None:
    """Build (once per source, torch and CPU) and load the library: registers torch.ops.kvserve.*.
    Raises where it cannot; engine/platform.py decides whether the kernels are used."""
    torch.ops.load_library(str(_library()))


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 scale: float, skip: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    """q [B, heads, D]; kv_cache [2, num_blocks, block_size, kv_heads, D]; block_tables [B, width] and
    context_lens [B] int64; skip [B] int64: keys at the start of each row's first block not to attend
    to (a sliding window's, engine/layers/attention.py); softcap: scaled scores s become
    softcap * tanh(s / softcap) (Gemma 2) -> out [B, heads, D]."""
    return torch.ops.kvserve.paged_decode(q.contiguous(), kv_cache[0], kv_cache[1], block_tables, context_lens,
                                          scale, skip, softcap or 0.0)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] (M small); weight [N, K]; bias [N] -> [M, N]."""
    return torch.ops.kvserve.skinny_linear(x.contiguous(), weight, bias)


def gguf_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, out_features: int,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] float32; q, scales: GGUF blocks repacked by engine/layers/gguf_linear.py; bias [N]
    -> [M, N]."""
    return torch.ops.kvserve.gguf_linear(x.contiguous(), q, scales, out_features, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H]; weight [H] -> [T, H], as engine/models/llama.py rms_norm."""
    return torch.ops.kvserve.rms_norm(x.contiguous(), weight, eps)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (h + delta, its norm), as engine/models/llama.py add_rms_norm."""
    return torch.ops.kvserve.add_rms_norm(h.contiguous(), delta.contiguous(), weight, eps)


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
             head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [T, (heads + 2 kv_heads) * D]; cos, sin [T, 1, D] -> q, k rotated and v, as
    engine/models/llama.py rope_qkv."""
    t = qkv.shape[0]
    qkv = qkv.contiguous()
    q, k = torch.ops.kvserve.rope_qk(qkv, cos.reshape(t, head_dim), sin.reshape(t, head_dim), num_heads, num_kv_heads)
    return q, k, qkv[:, (num_heads + num_kv_heads) * head_dim:].view(t, num_kv_heads, head_dim)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 I] -> silu(gate) * up [T, I]."""
    return torch.ops.kvserve.silu_mul(gate_up.contiguous())


def decode_layers(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                  block_tables: torch.Tensor, context_lens: torch.Tensor, kv_caches: list[torch.Tensor],
                  weights: list[torch.Tensor], heads: int, kv_heads: int, scale: float, eps: float) -> torch.Tensor:
    """One decode step of a stack of Llama layers on GGUF-block linears in one call (cpu.cpp
    decode_layers: the per-op path's kernels, without Python between them). hidden [T, H] float32;
    cos, sin [T, D]; slots [T]; block_tables [T, width] and context_lens [T] int64; kv_caches: each
    layer's pool; weights: 14 a layer (engine/models/llama.py fused_decode_weights) -> [T, H] after
    the last layer, before the final norm."""
    return torch.ops.kvserve.decode_layers(hidden.contiguous(), cos.contiguous(), sin.contiguous(), slots,
                                           block_tables, context_lens, kv_caches, weights, heads, kv_heads, scale,
                                           eps)


# -march of each instruction set gguf_matmul.h has a path for, and the CPU flags a build of it needs
ISAS = {"x86-64-v4": {"avx512f", "avx512bw", "avx512vl"},  # AVX-512
        "x86-64-v3": {"avx2", "fma", "f16c"},  # AVX2
        "x86-64": set()}  # neither


def runnable_isas() -> list[str]:
    """The ISAS this CPU can run (none off x86-64)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return ["x86-64"]
    flags = set(line.split(":", 1)[1].split())
    return [march for march, needs in ISAS.items() if needs <= flags]


class GGUFCheck:
    """gguf_matmul.h built alone for one instruction set (`march`: a -march value such as
    "x86-64-v4" for AVX-512, "x86-64-v3" for AVX2, "x86-64" for neither), called through ctypes: the
    tests compare the kernel's paths for each instruction set this CPU can run, whichever it is, and
    benchmarks/cpu_kernels.py times the AVX2 path on an AVX-512 machine. Builds in ~1 s."""

    def __init__(self, march: str) -> None:
        flags = [f if f != "-march=native" else f"-march={march}" for f in FLAGS]
        command = lambda out: [os.environ.get("CXX", "c++"), *flags, str(GGUF_CHECK), "-o", str(out)]  # noqa: E731
        self.lib = ctypes.CDLL(str(_built(f"gguf-{march}", command, " ".join(flags))))
        self.lib.kvserve_gguf_matmul.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int]
        self.vector_bits = self.lib.kvserve_gguf_vector_bits()

    def linear(self, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, out_features: int,
               bias: torch.Tensor | None) -> torch.Tensor:
        """As gguf_linear, without its checks: the caller passes what gguf_linear would accept."""
        x = x.contiguous()
        y = torch.empty(x.shape[0], out_features)
        self.lib.kvserve_gguf_matmul(x.data_ptr(), q.data_ptr(), scales.data_ptr(),
                                     None if bias is None else bias.data_ptr(), y.data_ptr(), x.shape[0],
                                     out_features, x.shape[1], int(scales.shape[2] == 2))
        return y
