"""Lookahead decoding (Fu et al., 2023) as a proposer: guesses refined by Jacobi iteration in the
same forward pass that checks candidates drawn from the n-grams they produced.

Per sequence, a window of (up to) N-1 levels of W guesses, the latest Jacobi iterations: the
guess at level l, column w stands for the token 1 + l + w positions after the last token, and it
sees level 0's columns up to w and its own column's earlier levels (the tokens at the positions
between: lookahead's attention mask). Each step runs the window (the lookahead branch) and the
candidates (the verification branch) as one draft tree beside the last token; the runner keeps
the longest candidate the target would have produced itself. The target's picks at the last
level's guesses make, each with its column, a new n-gram for the sequence's pool, and a new
last level (the oldest goes). Candidates: up to G pool entries that start with the last token,
those that came after the same token as the last one does first, merged into a trie. The pool
also holds the prompt's n-grams, as the reference implementation can, and the output's as it
grows. A sequence whose recent steps kept little pauses, as under the n-gram proposer
(spec_decode.DraftHistory), measured against the most a step can keep (N - 1 drafts).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from engine.core.request import DraftTree, ProposerState, Request
from engine.runner.spec_decode import MAX_LOOKBACK, DraftHistory, Proposer, can_draft


@dataclass
class LookaheadState(ProposerState):
    """One sequence's window and pool (Request.spec_state)."""

    levels: list[list[int]]  # [level][column] guesses, the oldest level first
    pool: dict[int, list[tuple[int, ...]]] = field(default_factory=dict)  # first token -> continuations, newest first
    # (token before, first token) -> continuations, newest first: the likelier candidates
    pool2: dict[tuple[int, int], list[tuple[int, ...]]] = field(default_factory=dict)
    seen: int = 0  # the sequence's tokens whose n-grams are in the pool
    guesses_at: int | None = None  # index of the window's first guess in the last proposal's drafts
    history: DraftHistory = field(default_factory=DraftHistory)

    def candidates(self, before: int, last: int, g: int) -> list[tuple[int, ...]]:
        """Up to g continuations of `last`: those seen after `before` then `last` first."""
        out = list(self.pool2.get((before, last), ()))[:g]
        out += [c for c in self.pool.get(last, ()) if c not in out][:g - len(out)]
        return out


class LookaheadProposer(Proposer):
    def __init__(self, config, max_model_len: int) -> None:
        super().__init__(config, max_model_len)
        self.rng = random.Random(0)  # the first guesses, drawn from the prompt

    def propose(self, running: list[Request]) -> None:
        if self.drafting(running):
            for req in running:
                if can_draft(req) and self._state(req).history.may_draft():
                    self._propose(req)

    def _state(self, req: Request) -> LookaheadState:
        if req.spec_state is None:
            prompt = req.prompt_token_ids[-MAX_LOOKBACK:]
            req.spec_state = LookaheadState([[self.rng.choice(prompt) for _ in range(self.config.window)]],
                                            seen=max(0, req.num_tokens - MAX_LOOKBACK))
        return req.spec_state

    def _propose(self, req: Request) -> None:
        c = self.config
        st = req.spec_state
        self._add_ngrams(st, req.token_ids)
        tokens: list[int] = []
        offsets: list[int] = []
        sees: list[tuple[int, ...]] = []
        parents: list[int | None] = []
        # the verification branch: the candidates, as a trie of the drafts that follow the last token
        k = self.room(req, c.ngram - 1)
        node: dict[tuple[int, int], int] = {}  # (parent, token) -> draft index
        for cont in st.candidates(req.token_ids[-2], req.token_ids[-1], c.guess) if k > 0 else []:
            parent = -1
            for depth, tok in enumerate(cont[:k]):
                if (parent, tok) not in node:
                    node[parent, tok] = len(tokens)
                    tokens.append(tok)
                    offsets.append(depth + 1)
                    parents.append(parent)
                    sees.append(() if parent < 0 else (*sees[parent], parent))
                parent = node[parent, tok]
        # the lookahead branch, where its positions fit in the context
        st.guesses_at = None
        levels = len(st.levels)
        if req.num_tokens + levels + c.window <= self.max_model_len:
            st.guesses_at = len(tokens)
            at = {}  # (level, column) -> draft index
            for lvl in range(levels):
                for w in range(c.window):
                    at[lvl, w] = len(tokens)
                    tokens.append(st.levels[lvl][w])
                    offsets.append(1 + lvl + w)
                    parents.append(None)
                    sees.append(tuple(at[0, col] for col in range(w + (lvl > 0))) +
                                tuple(at[m, w] for m in range(1, lvl)))
        if tokens:
            req.draft_token_ids = tokens
            req.draft_tree = DraftTree(offsets, sees, parents)

    def record(self, seqs, result) -> None:
        """The target's picks at the last level's guesses: new n-grams, and the window's next level."""
        c = self.config
        for s in seqs:
            picks = result.tree_picks.get(s.request.seq_id)
            st = s.request.spec_state
            if picks is None:
                continue
            st.history.record(c.ngram - 1, len(result.sampled[s.request.seq_id]) - 1)
            if st.guesses_at is None:
                continue
            last = len(st.levels) - 1
            first = 1 + st.guesses_at + last * c.window  # row 0 is the last token's
            new = picks[first:first + c.window]
            if len(st.levels) == c.ngram - 1:
                before = s.request.token_ids[-1]  # (at the window's proposal: the last token then)
                for w in range(c.window):
                    column = [level[w] for level in st.levels]
                    self._add(st, before, column[0], (*column[1:], new[w]))
                    before = column[0]
                del st.levels[0]
            st.levels.append(new)

    def _add_ngrams(self, st: LookaheadState, token_ids: list[int]) -> None:
        """The n-grams of the sequence's own tokens that end past those already added."""
        n = self.config.ngram
        for i in range(max(1, st.seen - n + 1), len(token_ids) - n + 1):
            self._add(st, token_ids[i - 1], token_ids[i], tuple(token_ids[i + 1:i + n]))
        st.seen = len(token_ids)

    def _add(self, st: LookaheadState, before: int, first: int, cont: tuple[int, ...]) -> None:
        for entries in (st.pool.setdefault(first, []), st.pool2.setdefault((before, first), [])):
            if cont in entries:
                entries.remove(cont)
            entries.insert(0, cont)
            del entries[self.config.guess:]
