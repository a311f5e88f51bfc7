"""Linear layers that multiply with a GGUF checkpoint's own quantised blocks, on CPU, losslessly.

The bundled SmolLM2 is a Q4_1 GGUF (embeddings Q8_0): every weight the model computes with is
d * q + m for a 4-bit q and a per-32 scale d and minimum m, turned into float32 when the file is
loaded. Streaming those float32 weights costs a decode step 540 MB of memory traffic; the blocks
they came from are 5-9 bits a weight. The C++ kernel (engine/kernels/cpu.py gguf_linear) rebuilds
the exact float32 weights in registers and multiplies in float32, so the arithmetic stays the
float32 model's (only the order of the sums differs, as between any two matmul kernels).

Each layer is switched only after its blocks are dequantised here and found equal, bit for bit, to
the float32 weight the model already holds; a layer whose blocks are missing, of another kind, or
not equal keeps its float32 path. Measured on the 2-core dev machine, all of SmolLM2's linears of
one step (benchmarks/cpu_kernels.py --parts gguf), against oneDNN on the float32 weights: see
BENCHMARKS.md.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.kernels import cpu
from engine.layers.parallel import Shard
from engine.paths import cache_root

log = logging.getLogger(__name__)

BLOCK = 32  # weights along the input dimension that share a scale, in every kind below
GROUP = 32  # output rows the kernel dequantises together
# bytes of one block: (scale bytes, minimum bytes, quant bytes)
KINDS = {"Q4_0": (2, 0, 16), "Q4_1": (2, 2, 16), "Q8_0": (2, 0, 32)}


class Blocks:
    """One weight [N, K] as GGUF blocks: q [N, K] (0..15 or -128..127), d and m [N, K / 32] float32
    (m None where the kind has no minimum). Q4_0 stores q - 8, kept here as q with m = -8 d: the
    same products, since d * (q - 8) = d * q - 8 d exactly in float32."""

    def __init__(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> None:
        self.q, self.d, self.m = q, d, m

    @classmethod
    def from_gguf(cls, kind: str, raw: np.ndarray, n: int, k: int) -> Blocks:
        d_bytes, m_bytes, q_bytes = KINDS[kind]
        b = torch.from_numpy(np.array(raw, copy=True).reshape(n, k // BLOCK, d_bytes + m_bytes + q_bytes))
        d = b[..., :2].contiguous().view(torch.float16)[..., 0].float()
        m = b[..., 2:4].contiguous().view(torch.float16)[..., 0].float() if m_bytes else None
        qs = b[..., d_bytes + m_bytes:]
        if kind == "Q8_0":
            return cls(qs.contiguous().view(torch.int8).reshape(n, k), d, None)
        # 4-bit: byte j of a block holds q[j] in its low nibble and q[j + 16] in its high one
        q = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(n, k)
        return cls(q, d, m if m is not None else -8 * d)

    def rows(self, index: torch.Tensor) -> Blocks:
        return Blocks(self.q[index], self.d[index], None if self.m is None else self.m[index])

    def shard(self, shard: Shard) -> Blocks | None:
        """A tensor-parallel rank's part (engine/layers/parallel.py); None where its columns do not
        start and end on whole blocks."""
        scales = shard  # q's rows are the scales' rows; its columns are BLOCK to a scale
        if shard.cols is not None:
            first, n = shard.cols
            if first % BLOCK or n % BLOCK:
                return None
            scales = Shard(cols=(first // BLOCK, n // BLOCK))
        # (padding rows get zero scales: zero weights)
        return Blocks(shard.of(self.q), scales.of(self.d), None if self.m is None else scales.of(self.m))

    @staticmethod
    def cat(parts: list[Blocks]) -> Blocks:
        if len({p.m is None for p in parts}) > 1:
            raise ValueError("cannot fuse 4-bit and 8-bit blocks into one layer")
        return Blocks(torch.cat([p.q for p in parts]), torch.cat([p.d for p in parts]),
                      None if parts[0].m is None else torch.cat([p.m for p in parts]))

    def dequantize(self) -> torch.Tensor:
        """-> [N, K] float32, as the gguf package computes it (d * q, + m)."""
        n, k = self.q.shape
        w = self.d[..., None] * self.q.view(n, k // BLOCK, BLOCK).float()
        if self.m is not None:
            w = w + self.m[..., None]
        return w.reshape(n, k)

    def pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> the kernel's layout (engine/kernels/gguf_matmul.h): q [groups, K / 32, 512 or 1024]
        uint8 and scales [groups, K / 32, 2 or 1, 32] float16, output rows padded to whole groups.
        Raises ValueError where a scale is not a float16 (Q4_0's minimum -8 d past float16's range)."""
        n, k = self.q.shape
        groups, blocks = -(-n // GROUP), k // BLOCK
        pad = groups * GROUP - n
        q = nn.functional.pad(self.q, (0, 0, 0, pad)).view(groups, GROUP, blocks, BLOCK)
        q = q.permute(0, 2, 3, 1)  # [groups, blocks, k, row]
        if self.m is not None:  # two k to a byte: even k in the low nibble
            q = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).to(torch.uint8)
        else:
            q = q.to(torch.int8).view(torch.uint8)
        scales = torch.stack([self.d] if self.m is None else [self.d, self.m])  # [1 or 2, N, blocks]
        scales = nn.functional.pad(scales, (0, 0, 0, pad)).view(-1, groups, GROUP, blocks).permute(1, 3, 0, 2)
        halves = scales.half()
        if not torch.equal(halves.float(), scales):
            raise ValueError("a block's scale or minimum is not a float16")
        return q.reshape(groups, blocks, -1).contiguous(), halves.contiguous()


class GGUFLinear(nn.Module):
    def __init__(self, blocks: Blocks, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = blocks.q.shape
        self.q, self.scales = blocks.pack()
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] float32 -> [T, out]."""
        return cpu.gguf_linear(x, self.q, self.scales, self.out_features, self.bias)


def read_gguf_blocks(path: Path) -> dict[str, Blocks]:
    """Every Q4_0 / Q4_1 / Q8_0 matrix of a GGUF file, by its GGUF name."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, kind, offset, rows, row_bytes, n, k in _block_table(path):
        out[name] = Blocks.from_gguf(kind, data[offset:offset + rows * row_bytes].reshape(rows, row_bytes), n, k)
    return out


def _block_table(path: Path) -> list[list]:
    """[name, kind, byte offset, rows, bytes a row, n, k] of each block matrix in the file. gguf's
    reader decodes every metadata value to reach the tensors (the bundled file's vocabulary and
    merges: 4 of the 6 s an engine took to start), so the table it finds is kept in the cache
    directory, keyed by the file's path, size and modification time, and read from there after."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    kept = cache_root() / "gguf-tables" / f"{key}.json"
    try:
        return json.loads(kept.read_text())
    except (OSError, ValueError):
        pass
    import gguf

    table = []
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.tensor_type.name in KINDS and len(t.shape) == 2:
            k, n = (int(s) for s in t.shape)  # GGUF lists the fastest-varying dimension first
            rows, row_bytes = t.data.shape
            table.append([t.name, t.tensor_type.name, int(t.data_offset), int(rows), int(row_bytes), n, k])
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        part = kept.with_suffix(f".{os.getpid()}.part")
        part.write_text(json.dumps(table))
        os.replace(part, kept)  # (whole or not at all, whoever writes it first)
    except OSError:  # a read-only cache: read the file each time
        log.info("could not keep the GGUF tensor table in %s", kept.parent)
    return table


def _unpermute(n: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's converter on q and k (it interleaves each head's two
    rotary halves), as transformers does when it loads a llama GGUF."""
    return torch.arange(n).view(heads, n // heads // 2, 2).transpose(1, 2).reshape(n)


def _sources(model: nn.Module, hf_config) -> dict[str, list[list[tuple[str, int | None]]]]:
    """Our module name -> candidate layouts, each a list of (GGUF tensor, heads to un-permute)
    whose rows concatenated make the module's weight."""
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    out = {}
    for i in range(len(model.layers)):
        b = f"blk.{i}."
        qkv = [(b + "attn_q.weight", heads), (b + "attn_k.weight", kv_heads), (b + "attn_v.weight", None)]
        out[f"layers.{i}.self_attn.qkv_proj"] = [qkv, [(name, None) for name, _ in qkv]]
        out[f"layers.{i}.self_attn.o_proj"] = [[(b + "attn_output.weight", None)]]
        out[f"layers.{i}.mlp.gate_up_proj"] = [[(b + "ffn_gate.weight", None), (b + "ffn_up.weight", None)]]
        out[f"layers.{i}.mlp.down_proj"] = [[(b + "ffn_down.weight", None)]]
    out["lm_head"] = [[("output.weight", None)], [("token_embd.weight", None)]]
    return out


def _matching_blocks(blocks: dict[str, Blocks], layouts, weight: torch.Tensor,
                     shard: Shard | None) -> Blocks | None:
    for layout in layouts:
        if not all(name in blocks for name, _ in layout):
            continue
        parts = [blocks[name] if h is None else blocks[name].rows(_unpermute(blocks[name].q.shape[0], h))
                 for name, h in layout]
        try:
            candidate = Blocks.cat(parts)
        except ValueError:
            continue
        if shard is not None:
            candidate = candidate.shard(shard)
        if candidate is not None and candidate.q.shape == weight.shape and torch.equal(candidate.dequantize(), weight):
            return candidate
    return None


def use_gguf_linears(model: nn.Module, path: Path, hf_config, shard_of=None) -> int:
    """Replace each float32 CPU nn.Linear whose weight the GGUF file's blocks reproduce exactly by a
    GGUFLinear; returns how many. shard_of(weight name) -> Shard | None: under tensor parallelism,
    the part of the whole weight this rank's linear holds (the blocks are cut to it)."""
    blocks = read_gguf_blocks(path)
    replaced = 0
    for name, layouts in _sources(model, hf_config).items():
        linear = model.get_submodule(name)
        if not (isinstance(linear, nn.Linear) and linear.weight.dtype == torch.float32
                and linear.weight.device.type == "cpu"):
            continue
        found = _matching_blocks(blocks, layouts, linear.weight, shard_of and shard_of(f"{name}.weight"))
        if found is None:
            log.info("%s: no GGUF blocks in %s reproduce its weight; it stays float32", name, path.name)
            continue
        try:
            model.set_submodule(name, GGUFLinear(found, linear.bias))
        except ValueError as e:
            log.info("%s: %s; it stays float32", name, e)
            continue
        replaced += 1
    return replaced
