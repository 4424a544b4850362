"""A small sentencepiece model trained in memory, for detokenizer and stop-string tests.

The tokenizer wrapper follows the protocol the runtime's detokenizer documents
(``decode(ids, skip_special_tokens)``, ``id_to_piece``, ``special_ids``) with the same
special-token handling as resultity_runtime._tokenizer, without depending on that module.
"""

from __future__ import annotations

import functools
import io
import random
from collections.abc import Sequence

import sentencepiece as spm

_TEXT = (
    "the quick brown fox jumps over a lazy dog while hello world says goodbye to everyone "
    "café naïve résumé façade über straße große señor niño "
    "東京 日本語 中文 汉字 テスト こんにちは 안녕하세요 Привет мир γειά σου "
    "😀 🎉 🤖 👍🏽 ✓ € £ ¥ — … « » 12 345 6789 , . ! ? : ; ( ) [ ] { } ' \" - _ / \\ @ # %"
)
_WORDS = tuple(_TEXT.split())


@functools.lru_cache(maxsize=1)
def spm_model_bytes(vocab_size: int = 420) -> bytes:
    """Return the serialized model: BPE, byte fallback, deterministic (one thread, fixed text)."""
    rng = random.Random(1234)
    sentences = [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 14))) for _ in range(3000)
    ]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=out,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.98,
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue()


class SpmTokenizer:
    """encode / decode / id_to_piece over the trained model; control ids are special."""

    def __init__(self, model: bytes) -> None:
        self._sp = spm.SentencePieceProcessor(model_proto=model)
        self.vocab_size: int = self._sp.get_piece_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.special_ids = frozenset(
            i for i in range(self.vocab_size) if self._sp.is_control(i) or self._sp.is_unknown(i)
        )

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(self._sp.encode(text)) if text else []
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            return str(self._sp.decode([i for i in ids if i not in self.special_ids]))
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.special_ids:
                out += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def id_to_piece(self, token_id: int) -> str:
        return str(self._sp.id_to_piece(token_id))


@functools.lru_cache(maxsize=1)
def spm_tokenizer() -> SpmTokenizer:
    """Return the shared test tokenizer (trained once per process)."""
    return SpmTokenizer(spm_model_bytes())
