"""Incremental detokenization (UTF-8 safe) and stop strings across token boundaries."""
import pytest

from engine.frontend.detokenizer import IncrementalDetokenizer, SequenceText

TEXTS = [
    "Plain ASCII text, with punctuation!",
    "Emoji: 🚀🔥 and a family 👨‍👩‍👧 in one line.",
    "中文字符测试，日本語のテキスト、한국어 문장.",
    "Mixed: café naïve 😀 東京 ok",
]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_are_whole_characters_and_join_to_the_full_decode(smollm2_tokenizer, text):
    ids = smollm2_tokenizer.encode(text)
    detok = IncrementalDetokenizer(smollm2_tokenizer, prompt_token_ids=[])
    pieces = [detok.push(t) for t in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == smollm2_tokenizer.decode(ids)


def test_some_tokens_really_split_characters(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode(TEXTS[1] + TEXTS[2])
    assert any("\ufffd" in smollm2_tokenizer.decode([t]) for t in ids)


def test_prompt_context_keeps_spacing(smollm2_tokenizer):
    prompt = smollm2_tokenizer.encode("Hello there")
    out = smollm2_tokenizer.encode(" my friend")
    detok = IncrementalDetokenizer(smollm2_tokenizer, prompt)
    text = "".join(detok.push(t) for t in out) + detok.flush()
    assert text == smollm2_tokenizer.decode(prompt + out)[len(smollm2_tokenizer.decode(prompt)):]


def test_unfinished_character_is_flushed_at_the_end(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("🚀")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(smollm2_tokenizer, [])
    assert detok.push(ids[0]) == ""
    assert detok.flush() == smollm2_tokenizer.decode(ids[:1])


def _stream(tokenizer, text: str, stops: list[str]):
    seq = SequenceText(IncrementalDetokenizer(tokenizer, []), stops)
    shown, hit = [], None
    for t in tokenizer.encode(text):
        hit = seq.append(t, check_stops=True)
        shown.append(seq.visible(finished=hit is not None))
        if hit:
            break
    return seq, shown, hit


def test_stop_string_split_across_tokens_is_cut_and_never_shown(smollm2_tokenizer):
    text = "The answer is forty-two. Next question please."
    stop = "two. Next"
    ids = smollm2_tokenizer.encode(text)
    pieces = [smollm2_tokenizer.decode([t]) for t in ids]
    assert not any(stop in p for p in pieces)  # the stop string really spans tokens
    seq, shown, hit = _stream(smollm2_tokenizer, text, [stop, "never"])
    assert hit == stop
    assert seq.text == text[:text.index(stop)]
    assert all(stop[:3] not in s for s in shown)  # the start of the stop string was held back
    assert all(a == b[:len(a)] for a, b in zip(shown, shown[1:]))  # shown text only grows


def test_earliest_stop_string_wins(smollm2_tokenizer):
    seq, _, hit = _stream(smollm2_tokenizer, "alpha beta gamma delta", ["delta", "beta"])
    assert hit == "beta" and seq.text == "alpha "
