"""Incremental detokenization and stop-string matching for one sequence."""
from __future__ import annotations

# Prompt tokens decoded ahead of the output, so the first output token gets the spacing it
# has in context (SentencePiece drops a leading space when a token is decoded alone).
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Turns tokens into text piece by piece; never emits half a UTF-8 character.

    Each push decodes a short window [prefix_offset:] and returns the part beyond what the
    window [prefix_offset:read_offset] already produced, unless it ends in U+FFFD (an incomplete
    byte sequence), in which case the text waits for the next token.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end: whatever was held back (an unfinished character shows as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full[len(prefix):]


class SequenceText:
    """Output text of one sequence, cut at the first stop string (which is left out)."""

    def __init__(self, detokenizer: IncrementalDetokenizer, stop_strings: list[str]) -> None:
        self.detokenizer = detokenizer
        self.stop_strings = stop_strings
        self._longest_stop = max((len(s) for s in stop_strings), default=0)
        self.text = ""

    def append(self, token_id: int, check_stops: bool) -> str | None:
        """Add one token's text; return the stop string it completed, if any."""
        return self._add(self.detokenizer.push(token_id), check_stops)

    def finish(self) -> None:
        self._add(self.detokenizer.flush(), check_stops=False)

    def _add(self, piece: str, check_stops: bool) -> str | None:
        if not piece:
            return None
        start = max(0, len(self.text) - self._longest_stop + 1)
        self.text += piece
        if not (check_stops and self.stop_strings):
            return None
        hits = [(i, s) for s in self.stop_strings if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return None
        i, stop = min(hits)
        self.text = self.text[:i]
        return stop

    def visible(self, finished: bool) -> str:
        """Text safe to show: while running, hold back a tail that may begin a stop string."""
        if finished or not self.stop_strings:
            return self.text
        for k in range(min(self._longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return self.text[:-k]
        return self.text
