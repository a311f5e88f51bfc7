"""The model side of an engine: what the model is, where it runs, and its memory.

The executor resolves the model (its config, tokenizer and stop tokens), picks the device, dtype
and kernels, starts the tensor-parallel ranks, builds the model (and a draft model), sizes the
KV pool once the model is built (model_spec.py), and builds the runner. The engine above asks it
for these and runs each step through `execute`, which tells a device fault (the end of every
request) from an error of the step.
"""
from __future__ import annotations

import logging
import weakref

import torch
import torch.distributed as dist

from engine import platform
from engine.core.config import EngineConfig
from engine.core.scheduler import SchedulerOutput
from engine.layers.parallel import SINGLE, RanksOutOfStep, TensorParallel
from engine.models.llama import head_dim
from engine.models.loader import build_model, eos_token_ids, load_hf_config, load_tokenizer, resolve_source
from engine.runner import tp_worker
from engine.runner.model_spec import ModelSpec, PoolSpec, kv_bytes_per_block
from engine.runner.runner_output import ModelRunnerOutput

logger = logging.getLogger(__name__)


class DeviceFaultError(RuntimeError):
    """The device failed in a way no request can be served after (a lost or corrupted CUDA context)."""


class Executor:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        src = resolve_source(config.model)
        self.model_name = config.served_model_name or src.name
        self.hf_config = load_hf_config(src)
        self.tokenizer = load_tokenizer(src, config.tokenizer)
        self.eos_token_ids = eos_token_ids(src, self.hf_config, self.tokenizer)
        self.device = platform.pick_device(config.device)
        self.dtype = platform.pick_dtype(config.dtype, self.hf_config, self.device)
        self.max_model_len = self._max_model_len()
        torch.manual_seed(config.seed)
        # tensor parallelism: this process is rank 0; its shapes are a rank's share
        self.tp = TensorParallel(0, config.tensor_parallel_size)
        self.backends = platform.choose(config, self.device, self.dtype, _attention_shape(self.hf_config, self.tp),
                                        src.gguf_origin is not None)
        spec = config.speculative_config
        # a draft model of its own: built before the pool is sized, which holds its KV too
        self._draft = self._load_draft_model(spec.model) if spec and spec.method == "draft_model" \
            and spec.model != "self" else None
        self.ranks: tp_worker.Ranks | None = None  # ranks 1 .. size - 1
        self._finalizer: weakref.finalize | None = None  # stops them (close(), or when the engine is collected)
        graphs = self.backends.cuda_graphs and self.tp.size == 1
        model_spec = ModelSpec(src, self.hf_config, self.max_model_len, self.dtype, config.load_format, self.backends,
                               self._pool_spec(graphs), config.block_size, config.seed)
        if self.tp.size > 1:
            self._start_ranks(model_spec)
        model = model_spec.build_model(self.device, self.tp)
        blocks = model_spec.num_blocks(model, self.device)
        channel = self.ranks and self.ranks.channel
        self.num_kv_blocks = channel.agree(blocks) if channel else blocks  # (the fewest any rank holds)
        self.measured_activations = model_spec.measured  # (CUDA, no size given: what the pool left room for)
        self.long_rope_from: int | None = model.long_rope_from
        graphs = graphs and model.capturable
        self.runner = model_spec.build_runner(model, self.device, self.num_kv_blocks,
                                              config.max_num_seqs if graphs else 0)
        self.runner.channel = channel
        if channel:
            channel.all_built()
        if self._draft is not None:
            self.runner.use_draft_model(self._draft[0], self.num_kv_blocks + int(self.runner.graphs is not None))
        elif spec is not None and spec.method == "draft_model":
            self._use_draft_layers(spec.num_layers)

    # --- building -------------------------------------------------------------------------
    def _max_model_len(self) -> int:
        limit = getattr(self.hf_config, "max_position_embeddings", None) or 2048
        asked = self.config.max_model_len
        if asked is not None and asked > limit:
            raise ValueError(f"max_model_len: {asked} exceeds the model's limit of {limit} tokens")
        return asked or limit

    def _pool_spec(self, graphs: bool) -> PoolSpec:
        c = self.config
        draft = 0 if self._draft is None else kv_bytes_per_block(self._draft[1], c.block_size, self.dtype)
        return PoolSpec(c.num_kv_blocks, c.kv_cache_memory, c.gpu_memory_utilization, c.max_num_batched_tokens,
                        c.max_num_seqs, graphs, draft)

    def _use_draft_layers(self, num_layers: int) -> None:
        layers = self.hf_config.num_hidden_layers
        if num_layers >= layers:
            raise ValueError(f"speculative_config.num_layers: must be below the model's {layers} layers "
                             f"(got {num_layers})")
        self.runner.use_draft_layers(num_layers)

    def _load_draft_model(self, name: str) -> tuple[torch.nn.Module, object]:
        """(the draft model, its HF config); it must have the target's tokenizer."""
        src = resolve_source(name)
        cfg = load_hf_config(src)
        same_vocab = cfg.vocab_size == self.hf_config.vocab_size
        if not same_vocab or load_tokenizer(src, None).get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(f"speculative_config.model: {name} does not have the target's tokenizer")
        backends = platform.choose(self.config, self.device, self.dtype, _attention_shape(cfg),
                                   src.gguf_origin is not None)
        if backends.attention != self.backends.attention:
            raise ValueError(f"speculative_config.model: its attention shape needs the {backends.attention!r} decode "
                             f"kernel, the target's runs {self.backends.attention!r}: give --attention-backend torch")
        return build_model(src, cfg, self.max_model_len, self.dtype, self.device, self.config.load_format,
                           backends), cfg

    def _start_ranks(self, spec: ModelSpec) -> None:
        """Check the model splits over the ranks, start ranks 1 .., and join them as rank 0."""
        if dist.is_initialized():  # (torch.distributed has one default process group a process)
            raise RuntimeError("tensor_parallel_size: another engine's ranks are running in this process; "
                               "close() it first")
        self.tp.share(self.hf_config.intermediate_size, "intermediate_size")  # (heads: checked by the shape)
        self.tp, self.ranks = tp_worker.start(self.tp.size, self.device.type, self.config.tensor_parallel_timeout,
                                               spec)
        self._finalizer = weakref.finalize(self, self.ranks.stop)

    def close(self) -> None:
        """Stop the tensor-parallel ranks (nothing to do without them); no more steps run."""
        if self._finalizer is not None:
            self._finalizer()

    # --- what the engine asks -------------------------------------------------------------
    @property
    def kv_window(self) -> int | None:
        """The positions every layer attends to (None: all of them), of a draft model of its own too:
        it reads the same block tables."""
        windows = [self.runner.model.kv_window] + ([self._draft[0].kv_window] if self._draft is not None else [])
        return None if None in windows else max(windows)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step; DeviceFaultError where the device (or the ranks' lockstep) failed."""
        try:
            return self.runner.execute(sched)
        except Exception as e:
            if _is_device_fault(e):
                raise DeviceFaultError(f"the device failed: {e}") from e
            raise

    def describe(self) -> tuple[str, str]:
        """The start-up line's parts: (the model and its pool, which kernels run)."""
        blocks, bs = self.num_kv_blocks, self.config.block_size
        model = (f"model={self.model_name} device={self.device} dtype={str(self.dtype).removeprefix('torch.')} "
                 f"kv_blocks={blocks} x {bs} tokens = {blocks * bs} tokens max_model_len={self.max_model_len}")
        fused = getattr(self.runner.model, "fused_weights", None) is not None
        kernels = (f"linears={platform.linear_kinds(self.runner.model)} decode_attention={self.backends.attention} "
                   f"elementwise={self.backends.elementwise} decode_layers={'fused' if fused else 'per-op'}")
        return model, kernels


def follow_rank_zero(config: EngineConfig) -> bool:
    """Where torchrun started this process as rank 1 or above: run rank 0's steps on this rank's
    shard until it says stop, and say True; elsewhere (rank 0, or no launcher) False at once.
    ValueError where the launcher's world is not tensor_parallel_size (every rank says so at once,
    rather than waiting for ranks that will never come)."""
    launched = tp_worker.launched()
    if launched is not None and launched[1] != config.tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size: {config.tensor_parallel_size}, but the launcher started "
                         f"{launched[1]} processes (one a rank: give --tensor-parallel-size {launched[1]})")
    if launched is None or launched[0] == 0:
        return False
    tp_worker.run_rank(*launched, "env://", platform.pick_device(config.device).type, config.tensor_parallel_timeout)
    return True


def _is_device_fault(error: BaseException) -> bool:
    """A CUDA error leaves the context unusable for every request, and tensor-parallel ranks out of
    step cannot run another, so both end the engine; any other error is taken to be the fault of
    the request being served."""
    accelerator = getattr(torch, "AcceleratorError", ())
    if isinstance(error, (accelerator, RanksOutOfStep)):
        return True
    return isinstance(error, RuntimeError) and "CUDA error" in str(error)


def _attention_shape(hf_config, tp: TensorParallel = SINGLE) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim), as the model builds its attention (a rank's, under
    tensor parallelism)."""
    heads = tp.share(hf_config.num_attention_heads, "num_attention_heads")
    return heads, tp.kv_heads(hf_config.num_attention_heads, hf_config.num_key_value_heads)[1], head_dim(hf_config)
