"""kvserve engine: paged KV cache, continuous batching, token-exact with transformers."""
from engine.core.config import EngineConfig
from engine.core.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from engine.core.sampling_params import SamplingParams
from engine.frontend.async_llm import AsyncLLM, EngineDeadError, RequestFailedError
from engine.frontend.llm import LLM
from engine.frontend.llm_engine import ContextLengthError, LLMEngine
from engine.models.loader import bundled_model_dir

__all__ = ["LLM", "AsyncLLM", "CompletionOutput", "ContextLengthError", "EngineConfig", "EngineDeadError", "LLMEngine",
           "RequestFailedError", "RequestOutput", "SamplingParams", "TokenLogprobs", "bundled_model_dir"]
