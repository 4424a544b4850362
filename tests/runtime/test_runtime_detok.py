"""Tests of resultity_runtime._detok: incremental detokenization over a real sentencepiece model."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from _spm_fixture import SpmTokenizer, spm_model_bytes, spm_tokenizer
from hypothesis import given
from hypothesis import strategies as st

from resultity_runtime._detok import IncrementalDetokenizer

texts = st.lists(
    st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(list("aé東京😀🤖👍🏽€ñ ▁\n")),
        st.sampled_from(["hello", " world", "café", "日本語", "  "]),
    ),
    max_size=30,
).map("".join)


def stream(detok: IncrementalDetokenizer, ids: Sequence[int], full: str) -> list[str]:
    """Push ``ids`` one by one; check that the text so far is always a prefix of ``full``."""
    deltas: list[str] = []
    for token in ids:
        deltas.append(detok.push(token))
        assert full.startswith("".join(deltas))
    deltas.append(detok.flush())
    return deltas


@given(text=texts)
def test_unicode_text_streams_exactly_without_broken_characters(text: str) -> None:
    tok = spm_tokenizer()
    ids = tok.encode(text)
    full = tok.decode(ids)
    deltas = stream(IncrementalDetokenizer(tok), ids, full)
    assert "".join(deltas) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)


@given(
    ids=st.lists(st.integers(0, 419), max_size=40),
    skip=st.booleans(),
)
def test_arbitrary_ids_concatenate_to_decode(ids: list[int], skip: bool) -> None:
    # arbitrary ids include control tokens, lone spaces, and invalid byte sequences
    tok = spm_tokenizer()
    full = tok.decode(ids, skip_special_tokens=skip)
    deltas = stream(IncrementalDetokenizer(tok, skip_special_tokens=skip), ids, full)
    assert "".join(deltas) == full


class DecodeOnly:
    """The bare protocol: decode only, no id_to_piece, no special_ids."""

    def __init__(self, tok: SpmTokenizer) -> None:
        self._tok = tok

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens)


@given(text=texts)
def test_decode_only_tokenizer_uses_the_replacement_heuristic(text: str) -> None:
    tok = spm_tokenizer()
    ids = tok.encode(text)
    full = tok.decode(ids)
    deltas = stream(IncrementalDetokenizer(DecodeOnly(tok)), ids, full)
    assert "".join(deltas) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)


def test_emoji_from_byte_pieces_is_held_until_complete() -> None:
    tok = spm_tokenizer()
    ids = tok.encode("🦜 ok")  # not in the training text: byte fallback
    pieces = [tok.id_to_piece(i) for i in ids]
    assert sum(p.startswith("<0x") for p in pieces) == 4
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    first_byte = next(k for k, p in enumerate(pieces) if p.startswith("<0x"))
    assert deltas[first_byte : first_byte + 3] == ["", "", ""]
    assert deltas[first_byte + 3] == "🦜"
    assert "".join(deltas) + detok.flush() == "🦜 ok"


def test_incomplete_bytes_at_the_end_are_flushed_as_replacement() -> None:
    tok = spm_tokenizer()
    ids = [tok._sp.piece_to_id("<0xF0>"), tok._sp.piece_to_id("<0x9F>")]
    detok = IncrementalDetokenizer(tok)
    assert [detok.push(i) for i in ids] == ["", ""]
    assert detok.flush() == tok.decode(ids)
    assert "\ufffd" in tok.decode(ids)


def test_prompt_context_keeps_the_leading_space() -> None:
    tok = spm_tokenizer()
    prompt = tok.encode("hello", add_bos=True)
    out = tok.encode("world")  # the dummy prefix makes the first piece start with "▁"
    assert tok.id_to_piece(out[0]).startswith("▁")
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    text = "".join(detok.push(i) for i in out) + detok.flush()
    assert text.startswith(" world")
    assert tok.decode(prompt + out) == tok.decode(prompt) + text
    # without the prompt, the first leading space is dropped as decode(out) drops it
    alone = IncrementalDetokenizer(tok)
    assert "".join(alone.push(i) for i in out) + alone.flush() == tok.decode(out)


def test_special_tokens_are_skipped_or_spelled() -> None:
    tok = spm_tokenizer()
    ids = [*tok.encode("hi there"), tok.eos_id, *tok.encode("again")]
    skipped = IncrementalDetokenizer(tok)
    assert "".join(skipped.push(i) for i in ids) + skipped.flush() == "hi there again"
    kept = IncrementalDetokenizer(tok, skip_special_tokens=False)
    text = "".join(kept.push(i) for i in ids) + kept.flush()
    assert text == tok.decode(ids, skip_special_tokens=False)
    assert "</s>" in text
    assert skipped.output_ids == ids


class CountingTokenizer(SpmTokenizer):
    def __init__(self, model: bytes) -> None:
        super().__init__(model)
        self.widest = 0
        self.calls = 0

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.widest = max(self.widest, len(ids))
        self.calls += 1
        return super().decode(ids, skip_special_tokens)


def test_per_token_work_is_bounded() -> None:
    tok = CountingTokenizer(spm_model_bytes())
    text = " ".join(["the quick brown fox café 東京 🤖 jumps"] * 300)
    ids = tok.encode(text)
    assert len(ids) > 2000
    detok = IncrementalDetokenizer(tok)
    out = "".join(detok.push(i) for i in ids) + detok.flush()
    widest, calls = tok.widest, tok.calls
    assert out == tok.decode(ids)
    assert widest <= 16
    assert calls <= 2 * len(ids) + 2


def test_real_runtime_tokenizer_streams_exactly() -> None:
    tokenizer_module = pytest.importorskip("resultity_runtime._tokenizer")
    tok = tokenizer_module.Tokenizer(spm_model_bytes())
    text = "hello 東京 🦜 café\n  world ▁ ok"
    ids = [*tok.encode(text), tok.eos_id, *tok.encode(" again")]
    for skip in (True, False):
        full = tok.decode(ids, skip_special_tokens=skip)
        deltas = stream(IncrementalDetokenizer(tok, skip_special_tokens=skip), ids, full)
        assert "".join(deltas) == full
