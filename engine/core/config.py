"""Engine configuration: plain frozen data, validated, no I/O."""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from engine.core.sampling_params import _is_int

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
LOAD_FORMATS = ("auto", "dummy")
LINEAR_BACKENDS = ("auto", "torch", "onednn")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "cpp")

# Default KV pool size when neither a block count nor a memory budget is given (CPU).
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "t": 1e12, "tb": 1e12}


def parse_bytes(text: str) -> int:
    """'2GiB' -> 2147483648, '512MB' -> 512000000, '1024' -> 1024."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"kv_cache_memory: cannot parse {text!r} as a size such as '2GiB' or '512MB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


SPECULATIVE_METHODS = ("ngram", "lookahead", "draft_model")
# the keys each method reads, besides method and disable_by_batch_size
_SPECULATIVE_KEYS = {"ngram": {"num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"},
                     "lookahead": {"window", "ngram", "guess"},
                     "draft_model": {"model", "num_layers", "num_speculative_tokens"}}
# no drafts from this many running sequences on: where drafting stopped paying on the CPU measured
# (BENCHMARKS.md, "Speculative decoding"); a method's tree of drafts costs more rows than a chain
_DISABLE_BY_BATCH_SIZE = {"ngram": 8, "lookahead": 2, "draft_model": 2}


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding, as vLLM's `speculative_config`: a proposer drafts up to
    `num_speculative_tokens` tokens per sequence and step, the target model checks them all in one
    pass, and the longest prefix it would have produced itself is kept (so the output is the same).

    ngram (prompt lookup): the last prompt_lookup_max..prompt_lookup_min tokens of the sequence are
    looked up in its own earlier tokens (prompt and output), and what followed is the draft.
    lookahead (Fu et al.): a window of `window` Jacobi guesses over `ngram` - 1 levels runs beside
    up to `guess` candidate n-grams in each step's pass (engine/runner/lookahead.py).
    draft_model: a smaller model with the same tokenizer drafts num_speculative_tokens tokens, or
    with model "self" the target's first `num_layers` layers, its norm and head (LayerSkip-style
    early exit).
    disable_by_batch_size: no drafts in a step with this many running sequences or more, where the
    extra tokens cost more than the steps they save (None: always draft). The default ("auto") is
    the method's, where drafting stopped paying on the CPU it was measured on."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    # lookahead's W, N and G: the defaults are the best of those measured on the CPU (BENCHMARKS.md)
    window: int = 1
    ngram: int = 4
    guess: int = 2
    model: str | None = None  # draft_model: a path or id, or "self"
    num_layers: int | None = None  # draft_model "self": the layers that draft
    disable_by_batch_size: int | str | None = "auto"

    def __post_init__(self) -> None:
        if self.disable_by_batch_size == "auto" and self.method in _DISABLE_BY_BATCH_SIZE:
            object.__setattr__(self, "disable_by_batch_size", _DISABLE_BY_BATCH_SIZE[self.method])

        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ValueError(f"speculative_config.{name}: {why} (got {getattr(self, name)!r})")

        need(self.method in SPECULATIVE_METHODS, "method", f"must be one of {SPECULATIVE_METHODS}")
        if self.method == "draft_model":
            need(isinstance(self.model, str) and self.model != "", "model", 'must be "self" or a model path or id')
            if self.model == "self":
                need(_is_int(self.num_layers) and self.num_layers > 0, "num_layers", "must be a positive integer")
            else:
                need(self.num_layers is None, "num_layers", 'is for model "self" only')
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "window", "guess"):
            need(_is_int(getattr(self, name)) and 0 < getattr(self, name) <= 64, name, "must be in [1, 64]")
        need(_is_int(self.ngram) and 2 <= self.ngram <= 16, "ngram", "must be in [2, 16]")
        need(self.prompt_lookup_min <= self.prompt_lookup_max, "prompt_lookup_min", "must not exceed prompt_lookup_max")
        need(self.disable_by_batch_size is None or (_is_int(self.disable_by_batch_size)
                                                    and self.disable_by_batch_size > 0),
             "disable_by_batch_size", "must be a positive integer")

    @classmethod
    def parse(cls, value: str | dict[str, Any] | SpeculativeConfig) -> SpeculativeConfig:
        """From a dict or its JSON text (the command line's --speculative-config)."""
        if isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(f"speculative_config: not JSON ({e})") from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config: must be a JSON object")
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {', '.join(unknown)}")
        method = value.get("method", cls.method)
        unused = sorted(set(value) - {"method", "disable_by_batch_size"} - _SPECULATIVE_KEYS.get(method, set(value)))
        if unused:
            raise ValueError(f"speculative_config: method {method!r} does not read {', '.join(unused)}")
        return cls(**value)


def _option(default: Any, help: str, choices: tuple[str, ...] | None = None,
            parse: Callable[[str], Any] | None = None) -> Any:
    """A config field with what its command-line flag needs (server/cli.py makes one per field)."""
    return field(default=default, metadata={"help": help, "choices": choices, "parse": parse})


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = _option(None, "HF directory, .gguf file or hub id (default: bundled SmolLM2-135M-Instruct)")
    tokenizer: str | None = _option(None, "tokenizer directory or hub id (default: the model's own)")
    served_model_name: str | None = _option(None, "model name in the API (default: the model's)")
    dtype: str = _option("auto", "weights and KV-cache dtype (auto: float32 on CPU)", DTYPES)
    device: str = _option("auto", "where the model runs", DEVICES)
    max_model_len: int | None = _option(None, "context length (default: the model's)")
    max_num_seqs: int = _option(64, "sequences decoded together")
    max_num_batched_tokens: int = _option(2048, "tokens per engine step; longer prompts are prefilled in chunks")
    max_prefill_tokens_while_decoding: int = _option(
        0, "while more sequences decode than wait to start, prefill at most max(this, decoding sequences) prompt "
           "tokens a step, bounding inter-token latency when long prompts arrive (0 = no cap)")
    scheduling_policy: str = _option("fcfs", "fcfs: first come, first served; priority: requests' priority "
                                     "(lower first, then arrival) orders the queue and chooses whom to preempt",
                                     ("fcfs", "priority"))
    block_size: int = _option(16, "tokens per KV-cache block")
    num_kv_blocks: int | None = _option(None, "KV pool size in blocks (overrides the memory options)")
    kv_cache_memory: int | None = _option(None, "KV pool size in bytes, e.g. 2GiB (CPU default 1GiB)",
                                          parse=parse_bytes)
    gpu_memory_utilization: float = _option(0.9, "fraction of GPU memory the process may fill (CUDA only)")
    enable_prefix_caching: bool = _option(True, "reuse the KV blocks of prompt prefixes seen before")
    load_format: str = _option("auto", "dummy = random weights, for benchmarks", LOAD_FORMATS)
    # "auto", on CPU: float32 layers of a model converted from a GGUF multiply with its quantised
    # blocks (a C++ kernel, lossless: used only where the blocks reproduce the float32 weight bit for
    # bit); the rest use oneDNN pre-packed weights (float32, or bfloat16 where the CPU has bf16 dot
    # products) plus the C++ kernel for 1-2 rows. engine/platform.py decides.
    linear_backend: str = _option(
        "auto", "CPU linear layers: auto = the GGUF blocks where the model came from one, else oneDNN pre-packed "
                "weights plus a C++ kernel for decode steps of 1-2 sequences (holds the weights twice); onednn = "
                "packed only; torch = the reference", LINEAR_BACKENDS)
    attention_backend: str = _option(
        "auto", "decode attention: auto = the Triton paged kernel on CUDA where Triton is installed, a C++ paged "
                "kernel on CPU where a C++ compiler is; torch = the reference", ATTENTION_BACKENDS)
    enforce_eager: bool = _option(False, "no compiled kernels and no CUDA graphs (faster start, slower decode)")
    seed: int = _option(0, "seed of the shared sampling generator")
    tensor_parallel_size: int = _option(
        1, "ranks the model is split over (tensor parallelism: one process per rank, spawned on this machine or "
           "started by torchrun; gloo on CPU, NCCL on CUDA)")
    tensor_parallel_timeout: float = _option(
        600.0, "seconds a tensor-parallel step may wait for a rank; one that died or hung longer ends the engine")
    disable_log_stats: bool = _option(False, "no stats lines in the log (every 10 s while serving: throughput, "
                                             "batch, KV cache, speculative acceptance)")
    speculative_config: SpeculativeConfig | None = _option(  # noqa: RUF009 - a dataclasses.field, as above
        None, 'speculative decoding, as JSON: {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": '
              '4, "prompt_lookup_min": 2, "disable_by_batch_size": 8} or {"method": "lookahead", "window": 1, '
              '"ngram": 4, "guess": 2} or {"method": "draft_model", "model": PATH '
              'or "self", "num_layers": K for self} (default: off)',
        parse=SpeculativeConfig.parse)

    def validate(self) -> EngineConfig:
        def need(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise ValueError(f"{field}: {why} (got {getattr(self, field)!r})")

        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        need(self.device in DEVICES, "device", f"must be one of {DEVICES}")
        need(self.load_format in LOAD_FORMATS, "load_format", f"must be one of {LOAD_FORMATS}")
        need(self.linear_backend in LINEAR_BACKENDS, "linear_backend", f"must be one of {LINEAR_BACKENDS}")
        need(self.attention_backend in ATTENTION_BACKENDS, "attention_backend",
             f"must be one of {ATTENTION_BACKENDS}")
        need(self.max_model_len is None or self.max_model_len > 0, "max_model_len", "must be positive")
        need(self.max_num_seqs > 0, "max_num_seqs", "must be positive")
        need(self.max_num_batched_tokens > 0, "max_num_batched_tokens", "must be positive")
        need(self.max_prefill_tokens_while_decoding >= 0, "max_prefill_tokens_while_decoding",
             "must be 0 (no cap) or positive")
        need(self.block_size > 0, "block_size", "must be positive")
        need(self.num_kv_blocks is None or self.num_kv_blocks > 0, "num_kv_blocks", "must be positive")
        need(self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory", "must be positive")
        need(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", "must be in (0, 1]")
        need(isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1, "tensor_parallel_size",
             "must be a positive integer")
        need(0 < self.tensor_parallel_timeout <= 86400, "tensor_parallel_timeout",
             "must be above 0 and at most 86400 seconds (a day)")
        return self

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        if isinstance(kwargs.get("kv_cache_memory"), str):
            kwargs["kv_cache_memory"] = parse_bytes(kwargs["kv_cache_memory"])
        if kwargs.get("speculative_config") is not None:
            kwargs["speculative_config"] = SpeculativeConfig.parse(kwargs["speculative_config"])
        return cls(**kwargs).validate()
