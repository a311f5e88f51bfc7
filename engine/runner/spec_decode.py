"""Speculative decoding's proposers: each step they give decoding sequences draft tokens, which the
model runner checks in the same forward pass as the sequence's next token (model_runner._sample
keeps the drafts the target would have picked itself, so the output does not change).

ngram (prompt lookup, as vLLM's): the sequence's last n tokens, for n from prompt_lookup_max down
to prompt_lookup_min, are looked up in its earlier tokens; the tokens that followed their latest
earlier occurrence are the draft. One numpy comparison over the history per sequence and n, no
Python loop over tokens.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from engine.core.config import SpeculativeConfig
from engine.core.request import Request

# how far back a draft is looked for: bounds a step's cost on long sequences
MAX_LOOKBACK = 4096


def can_draft(req: Request) -> bool:
    """Whether req's next tokens may be checked several at once: a decoding sequence whose sampler
    stages do not depend on the tokens before (penalties and grammars do; they are not drafted)."""
    return (req.num_tokens - req.num_computed_tokens == 1 and req.grammar is None
            and not req.params.needs_penalties and req.num_output_tokens + 1 < req.max_tokens)


def ngram_draft(tokens: np.ndarray, k: int, n_max: int, n_min: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of tokens' last n tokens
    (longest n first); [] when none occurs earlier."""
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        suffix = tokens[-n:]
        windows = sliding_window_view(tokens[:-1], n)  # [L - n, n]: every earlier n-gram but the suffix
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = hits[-1] + n
            return tokens[start:start + k].tolist()
    return []


class NgramProposer:
    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len

    def propose(self, running: list[Request]) -> None:
        """Set the drafts of the running sequences that can take them (none past the batch size
        where speculation stops paying)."""
        c = self.config
        if c.disable_by_batch_size is not None and len(running) >= c.disable_by_batch_size:
            return
        for req in running:
            if not can_draft(req):
                continue
            # no draft past max_tokens or the context: the last token there is the target's own
            k = min(c.num_speculative_tokens, req.max_tokens - req.num_output_tokens - 1,
                    self.max_model_len - req.num_tokens - 1)
            if k <= 0:
                continue
            tokens = np.asarray(req.token_ids[-MAX_LOOKBACK:])
            req.draft_token_ids = ngram_draft(tokens, k, c.prompt_lookup_max, c.prompt_lookup_min)
