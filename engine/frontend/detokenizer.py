"""Incremental detokenization and stop-string matching for one sequence."""
from __future__ import annotations

import functools

# Prompt tokens decoded ahead of the output, so the first output token gets the spacing it
# has in context (SentencePiece drops a leading space when a token is decoded alone).
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Turns tokens into text piece by piece; never emits half a UTF-8 character.

    Each push decodes a short window [prefix_offset:] and returns the part beyond what the
    window [prefix_offset:read_offset] already produced, unless it ends in U+FFFD (an incomplete
    byte sequence), in which case the text waits for the next token.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool | None = None) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        backend = getattr(tokenizer, "_tokenizer", None)  # a fast tokenizer's Rust object
        if not skip_special_tokens and spaces_between_special_tokens is not None:
            self._decode = functools.partial(_decode_around_special, tokenizer, frozenset(tokenizer.all_special_ids),
                                             spaces_between_special_tokens)
        elif backend is not None and getattr(tokenizer, "clean_up_tokenization_spaces", None) is False:
            # what tokenizer.decode does then, less its Python wrapping: two decodes a token, this is
            # most of their cost (benchmarks/host_overhead.py --profile)
            self._decode = functools.partial(backend.decode, skip_special_tokens=skip_special_tokens)
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


def _decode_around_special(tokenizer, special: frozenset[int], spaces: bool, ids: list[int]) -> str:
    """ids' text with every special token decoded on its own, and with `spaces` a space between it
    and the text on either side (vLLM's spaces_between_special_tokens)."""
    parts, run = [], []
    for t in ids:
        if t in special:
            parts += [tokenizer.decode(run)] if run else []
            parts.append(tokenizer.decode([t]))
            run = []
        else:
            run.append(t)
    parts += [tokenizer.decode(run)] if run else []
    return (" " if spaces else "").join(parts)


class SequenceText:
    """Output text of one sequence, cut at the first stop string (which is left out unless
    `include_stop`).

    The text is kept as pieces, never re-joined while it grows: a consumer takes what became
    visible since it last asked (`take`), so the cost of a step does not grow with the output."""

    def __init__(self, detokenizer: IncrementalDetokenizer, stop_strings: list[str],
                 include_stop: bool = False) -> None:
        self.detokenizer = detokenizer
        self.stop_strings = stop_strings
        self.include_stop = include_stop
        self._longest_stop = max((len(s) for s in stop_strings), default=0)
        self._pieces: list[str] = []
        self._length = 0
        self._tail = ""  # the last _longest_stop - 1 characters: where a stop string may begin
        self._taken = 0  # characters handed out by take()

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def append(self, token_id: int, check_stops: bool) -> str | None:
        """Add one token's text; return the stop string it completed, if any."""
        return self._add(self.detokenizer.push(token_id), check_stops)

    def finish(self) -> None:
        self._add(self.detokenizer.flush(), check_stops=False)

    def _add(self, piece: str, check_stops: bool) -> str | None:
        if not piece:
            return None
        window = self._tail + piece  # the text from the first place a stop string could start
        base = self._length - len(self._tail)
        self._pieces.append(piece)
        self._length += len(piece)
        self._tail = window[-(self._longest_stop - 1):] if self._longest_stop > 1 else ""
        if not (check_stops and self.stop_strings):
            return None
        hits = [(i, s) for s in self.stop_strings if (i := window.find(s)) >= 0]
        if not hits:
            return None
        i, stop = min(hits)
        self._cut(base + i + (len(stop) if self.include_stop else 0))
        return stop

    def _cut(self, length: int) -> None:
        """Drop the text from `length` on (it lies within the last piece and the tail before it)."""
        while self._pieces and self._length - len(self._pieces[-1]) >= length:
            self._length -= len(self._pieces.pop())
        if self._length > length:
            last = self._pieces.pop()
            self._pieces.append(last[:len(last) - (self._length - length)])
            self._length = length
        self._tail = self._last_chars(min(self._longest_stop - 1, self._length))

    def _held_back(self, finished: bool) -> int:
        """Characters at the end not safe to show while running: a tail that may begin a stop string."""
        if finished or not self.stop_strings:
            return 0
        tail = self._tail
        for k in range(min(self._longest_stop - 1, len(tail)), 0, -1):
            if any(s.startswith(tail[-k:]) for s in self.stop_strings):
                return k
        return 0

    def visible(self, finished: bool) -> str:
        """Text safe to show: while running, hold back a tail that may begin a stop string."""
        text = self.text
        return text[:len(text) - self._held_back(finished)]

    def take(self, finished: bool) -> str:
        """The visible text not handed out before (a stop string may cut text already taken:
        then nothing more comes)."""
        end = self._length - self._held_back(finished)
        if end <= self._taken:
            return ""
        new = self._last_chars(self._length - self._taken)[:end - self._taken]
        self._taken = end
        return new

    def _last_chars(self, count: int) -> str:
        parts, n = [], 0
        for piece in reversed(self._pieces):
            if n >= count:
                break
            parts.append(piece)
            n += len(piece)
        return "".join(reversed(parts))[n - count:] if count else ""
