"""Offline batch generation, as vLLM's `LLM`."""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from engine.core.config import EngineConfig
from engine.core.outputs import RequestOutput
from engine.core.sampling_params import SamplingParams
from engine.frontend.llm_engine import LLMEngine

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, **options) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **options))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; results come back in input order. `priority`: one per
        prompt, under the priority scheduling policy (lower first), as vLLM's."""
        prompts = _as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        # Only the answers are wanted: the engine hands each back once, when it is complete.
        params = [dataclasses.replace(p, output_kind="final") for p in params]
        priority = list(priority) if priority is not None else [0] * len(prompts)
        if len(priority) != len(prompts):
            raise ValueError(f"priority: {len(priority)} given for {len(prompts)} prompts")
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        try:
            for rid, prompt, p, rank in zip(ids, prompts, params, priority):
                self.engine.add_request(rid, prompt, p, rank)
            return self._run(ids)
        finally:
            for rid in ids:
                self.engine.abort_request(rid)  # no-op for finished ones; frees the rest on error

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[rid] for rid in ids]


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts
