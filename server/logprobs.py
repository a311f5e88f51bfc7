"""Log-probabilities in the two OpenAI shapes.

Completions: parallel lists `tokens`, `token_logprobs`, `top_logprobs` (a dict per token holding
the top alternatives and always the chosen token) and `text_offset`. Chat: `content`, a list of
entries with `token`, `logprob`, `bytes` and `top_logprobs`. Both are dicts of lists, so the
pieces of one choice (echoed prompt, then each streamed delta) join with `concat`.
"""
from __future__ import annotations

import functools

from engine.core.outputs import TokenLogprobs

# JSON has no -inf; a token the model rules out entirely gets this instead (as vLLM does).
_FLOOR = -9999.0


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE (GPT-2 style) spells each byte as one printable character; invert that."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTES_OF_CHAR = _byte_decoder()


class TokenText:
    """Token id -> its text and its bytes; cached, since the same ids recur in every top-k list."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.text = functools.lru_cache(maxsize=1 << 16)(self._text)

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def bytes(self, token_id: int) -> list[int]:
        """The token's own bytes, also when it holds only part of a UTF-8 character."""
        text = self.text(token_id)
        if "\ufffd" in text:
            raw = self.tokenizer.convert_ids_to_tokens(token_id)
            if raw.startswith("<0x") and raw.endswith(">") and len(raw) == 6:  # SentencePiece byte fallback
                return [int(raw[3:5], 16)]
            if all(ch in _BYTES_OF_CHAR for ch in raw):
                return [_BYTES_OF_CHAR[ch] for ch in raw]
        return list(text.encode("utf-8"))


class TokenIdNames:
    """vLLM's return_tokens_as_token_ids: each token named "token_id:N", so that a client reads the
    ids back whatever their text (bytes stay the token's own)."""

    def __init__(self, texts: TokenText) -> None:
        self.texts = texts

    def text(self, token_id: int) -> str:
        return f"token_id:{token_id}"

    def bytes(self, token_id: int) -> list[int]:
        return self.texts.bytes(token_id)


def _lp(value: float) -> float:
    return max(value, _FLOOR)


def completion_logprobs(texts: TokenText, token_ids: list[int], entries: list[TokenLogprobs | None],
                        offset: int) -> tuple[dict, int]:
    """The completions shape for these tokens, their text offsets starting at `offset`; and the next offset.

    An entry is None where the model gives no log-probability (the first prompt token).
    """
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in zip(token_ids, entries):
        token = texts.text(token_id)
        out["tokens"].append(token)
        out["text_offset"].append(offset)
        offset += len(token)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        top = {texts.text(t): _lp(lp) for t, lp in entry.top}
        top.setdefault(token, _lp(entry.logprob))
        out["token_logprobs"].append(_lp(entry.logprob))
        out["top_logprobs"].append(top)
    return out, offset


def chat_logprobs(texts: TokenText, token_ids: list[int], entries: list[TokenLogprobs]) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        return {"token": texts.text(token_id), "logprob": _lp(logprob), "bytes": texts.bytes(token_id)}

    return {"content": [{**item(t, e.logprob), "top_logprobs": [item(a, lp) for a, lp in e.top]}
                        for t, e in zip(token_ids, entries)], "refusal": None}


def prompt_logprobs(texts: TokenText | TokenIdNames, token_ids: list[int],
                    entries: list[TokenLogprobs | None]) -> list[dict | None]:
    """vLLM's prompt_logprobs: per prompt token (None for the first), its id (as a string) and the
    top alternatives' ids, each to its logprob, rank in the vocabulary and text."""
    def item(token_id: int, logprob: float, rank: int) -> dict:
        return {"logprob": _lp(logprob), "rank": rank, "decoded_token": texts.text(token_id)}

    out: list[dict | None] = []
    for token_id, entry in zip(token_ids, entries):
        if entry is None:
            out.append(None)
            continue
        ranked = {str(token_id): item(token_id, entry.logprob, entry.rank)}
        for rank, (alt, logprob) in enumerate(entry.top, 1):
            ranked.setdefault(str(alt), item(alt, logprob, rank))
        out.append(ranked)
    return out


def concat(first: dict | None, second: dict | None) -> dict | None:
    if first is None or second is None:
        return first if second is None else second
    return {key: first[key] + second[key] for key in first}


def num_tokens(logprobs: dict | None) -> int:
    if logprobs is None:
        return 0
    return len(logprobs["content"] if "content" in logprobs else logprobs["tokens"])
