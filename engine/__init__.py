"""kvserve engine: paged KV cache, continuous batching, token-exact with transformers."""
from engine.async_llm import AsyncLLM, EngineDeadError, RequestFailedError
from engine.config import EngineConfig
from engine.llm import LLM
from engine.llm_engine import ContextLengthError, LLMEngine
from engine.outputs import CompletionOutput, RequestOutput
from engine.request import TokenLogprobs
from engine.sampling_params import SamplingParams

__all__ = ["AsyncLLM", "CompletionOutput", "ContextLengthError", "EngineConfig", "EngineDeadError", "LLM",
           "LLMEngine", "RequestFailedError", "RequestOutput", "SamplingParams", "TokenLogprobs"]
