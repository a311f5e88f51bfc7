"""kvserve engine: paged KV cache, continuous batching, token-exact with transformers."""
from engine.async_llm import AsyncLLM, EngineDeadError, RequestFailedError
from engine.config import EngineConfig
from engine.llm import LLM
from engine.llm_engine import ContextLengthError, LLMEngine
from engine.model_loader import bundled_model_dir
from engine.outputs import CompletionOutput, RequestOutput
from engine.request import TokenLogprobs
from engine.sampling_params import SamplingParams

__all__ = [
           "LLM",
           "AsyncLLM",
           "CompletionOutput",
           "ContextLengthError",
           "EngineConfig",
           "EngineDeadError",
           "LLMEngine",
           "RequestFailedError",
           "RequestOutput",
           "SamplingParams",
           "TokenLogprobs",
           "bundled_model_dir",
]
