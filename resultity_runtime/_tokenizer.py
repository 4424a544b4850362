"""A sentencepiece tokenizer with the Hugging Face chat template of tokenizer_config.json.

Plain ``encode`` never turns the text of control tokens (``<s>``, ``</s>``) into their ids, so
user text cannot inject them; ``encode_chat`` renders the template and does parse them.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import sentencepiece as spm
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ._config import ModelConfig, load_config
from ._errors import ChatTemplateError, ModelLoadError

__all__ = ["Tokenizer", "load_tokenizer", "render_chat_template"]

_SP_FILE = "tokenizer.model"
_TOK_CONFIG = "tokenizer_config.json"
_GEN_CONFIG = "generation_config.json"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# sentencepiece turns U+2581 (its space marker) back into a space on decode; we encode that
# character as its UTF-8 bytes through byte-fallback pieces so it round-trips.
_SPACE_MARK = "\u2581"


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    # compiling costs ~1.5 ms (the tiny preset's template), rendering a few us: a model's
    # template is compiled once, not for every request
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str | None] | None = None,
    **extra: Any,
) -> str:
    """Return the text of ``template`` rendered as transformers renders chat templates.

    (Immutable sandbox, trim_blocks/lstrip_blocks, loopcontrols, ``raise_exception``,
    ``tojson``, ``strftime_now``.) Raises ChatTemplateError for a syntax error or a
    ``raise_exception`` call in the template.
    """
    try:
        return _compile(template).render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            **dict(special_tokens or {}),
            **extra,
        )
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template: {exc}") from None


class Tokenizer:
    """A sentencepiece model plus the special tokens and chat template of tokenizer_config.json.

    Attributes: ``vocab_size``, ``bos_id``/``eos_id`` (None when absent), ``eos_ids`` (every
    id that ends generation), ``special_ids`` (ids that skip_special_tokens drops),
    ``bos_token``/``eos_token`` strings, ``chat_template`` (None when absent).
    """

    def __init__(
        self,
        sp_model: bytes,
        tokenizer_config: Mapping[str, Any] | None = None,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        self._sp = spm.SentencePieceProcessor(model_proto=sp_model)
        cfg = dict(tokenizer_config or {})
        sp = self._sp
        self.vocab_size: int = sp.get_piece_size()
        self.bos_id: int | None = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id: int | None = sp.eos_id() if sp.eos_id() >= 0 else None
        self.pad_id: int | None = sp.pad_id() if sp.pad_id() >= 0 else None
        self.add_bos_token: bool = bool(cfg.get("add_bos_token", self.bos_id is not None))
        self.chat_template: str | None = cfg.get("chat_template") if isinstance(
            cfg.get("chat_template"), str) else None
        self.special_tokens: dict[str, str | None] = {}
        for key in _SPECIAL_KEYS:
            self.special_tokens[key] = _token_text(cfg.get(key))
        default_ids = {"bos_token": self.bos_id, "eos_token": self.eos_id}
        for key, tid in default_ids.items():
            if self.special_tokens[key] is None and tid is not None:
                self.special_tokens[key] = sp.id_to_piece(tid)
        self.bos_token = self.special_tokens["bos_token"]
        self.eos_token = self.special_tokens["eos_token"]
        # text -> id of every special token string the chat path parses
        self._special_text: dict[str, int] = {}
        for i in range(self.vocab_size):
            if sp.is_control(i) or sp.is_unknown(i):
                self._special_text[sp.id_to_piece(i)] = i
        extra = cfg.get("additional_special_tokens") or []
        added = cfg.get("added_tokens_decoder") or {}
        texts = [_token_text(t) for t in extra]
        texts += [_token_text(t) for t in added.values() if isinstance(t, Mapping)
                  and t.get("special", True)]
        texts += list(self.special_tokens.values())
        for text in texts:
            if text is not None:
                tid = sp.piece_to_id(text)
                if tid != sp.unk_id() or text == sp.id_to_piece(sp.unk_id()):
                    self._special_text[text] = tid
        self.special_ids: frozenset[int] = frozenset(self._special_text.values())
        eos = [self.eos_id] if self.eos_id is not None else []
        eos += [i for i in eos_token_ids if i not in eos]
        self.eos_ids: tuple[int, ...] = tuple(eos)
        self._special_re = re.compile(
            "|".join(re.escape(t) for t in sorted(self._special_text, key=len, reverse=True))
        ) if self._special_text else None
        # sentencepiece matches user-defined symbols anywhere in text; plain encode splits
        # them after their first character so user text cannot produce a special token
        literal = sorted((t for t, i in self._special_text.items()
                          if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))),
                         key=len, reverse=True)
        self._literal_re = re.compile("|".join(map(re.escape, literal))) if literal else None
        self._space_mark_ids: list[int] | None = None
        pieces = [sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_MARK.encode()]
        # with a dummy prefix (Llama 2 style models) every encoded segment starts with a
        # space marker, so splitting text around U+2581 would add spaces: keep it whole there
        dummy_prefix = str(sp.encode("a", out_type=str)[0]).startswith(_SPACE_MARK)
        if all(sp.is_byte(p) for p in pieces) and not dummy_prefix:
            self._space_mark_ids = pieces

    def _encode_plain(self, text: str) -> list[int]:
        if self._literal_re is not None and self._literal_re.search(text):
            ids: list[int] = []
            pos = 0
            for m in self._literal_re.finditer(text):
                ids += self._encode_segment(text[pos:m.start() + 1])
                pos = m.start() + 1
            return ids + self._encode_segment(text[pos:])
        return self._encode_segment(text)

    def _encode_segment(self, text: str) -> list[int]:
        if _SPACE_MARK not in text or self._space_mark_ids is None:
            return list(self._sp.encode(text)) if text else []
        ids = []
        for k, part in enumerate(text.split(_SPACE_MARK)):
            if k:
                ids.extend(self._space_mark_ids)
            if part:
                ids.extend(self._sp.encode(part))
        return ids

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Return the token ids of ``text``, with the BOS id first when ``add_bos``."""
        ids = self._encode_plain(text)
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def encode_with_special(self, text: str, add_bos: bool = False) -> list[int]:
        """Like encode, but special-token strings in ``text`` become their ids.

        No BOS is added when the text already begins with the BOS token.
        """
        ids: list[int] = []
        pos = 0
        if self._special_re is not None:
            for m in self._special_re.finditer(text):
                ids.extend(self._encode_plain(text[pos:m.start()]))
                ids.append(self._special_text[m.group()])
                pos = m.end()
        ids.extend(self._encode_plain(text[pos:]))
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Return the text of ``ids``; special tokens are dropped or kept as their strings."""
        sp = self._sp
        if skip_special_tokens:
            return str(sp.decode([i for i in ids if i not in self.special_ids]))
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.special_ids:
                out.append(sp.decode(run))
                run = []
                out.append(sp.id_to_piece(i))
            else:
                run.append(i)
        out.append(sp.decode(run))
        return "".join(out)

    def id_to_piece(self, token_id: int) -> str:
        """Return the sentencepiece piece of ``token_id`` (``▁`` marks a space)."""
        return str(self._sp.id_to_piece(token_id))

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """Return the chat template rendered for ``messages``.

        Raises ChatTemplateError when there is no template or it fails to render.
        """
        if self.chat_template is None:
            raise ChatTemplateError(f"{_TOK_CONFIG}: chat_template: missing")
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens, **extra,
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Return the prompt ids of ``messages`` through the chat template, with one BOS."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self.encode_with_special(text, add_bos=self.add_bos_token)


def _generation_eos(path: Path) -> list[int]:
    gen_path = path / _GEN_CONFIG
    if not gen_path.is_file():
        return []
    try:
        raw = json.loads(gen_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(_GEN_CONFIG, f"cannot read: {exc}") from None
    value = raw.get("eos_token_id") if isinstance(raw, dict) else None
    items = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise ModelLoadError(_GEN_CONFIG, f"must be an id or a list of ids, got {value!r}",
                             field="eos_token_id")
    return list(items)


def load_tokenizer(model_dir: str | Path, config: ModelConfig | None = None) -> Tokenizer:
    """Return the Tokenizer of ``model_dir`` (tokenizer.model + optional tokenizer_config.json).

    ``eos_ids`` gathers the sentencepiece EOS, config.json's ``eos_token_id`` (from ``config``,
    else read from the directory) and generation_config.json's. Raises ModelLoadError naming
    the file when one is missing, unreadable or invalid.
    """
    path = Path(model_dir)
    try:
        proto = (path / _SP_FILE).read_bytes()
    except FileNotFoundError:
        raise ModelLoadError(_SP_FILE, f"no such file in {path}") from None
    except OSError as exc:
        raise ModelLoadError(_SP_FILE, f"cannot read: {exc}") from None
    cfg: dict[str, Any] = {}
    cfg_path = path / _TOK_CONFIG
    if cfg_path.is_file():
        try:
            raw = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(_TOK_CONFIG, f"cannot read: {exc}") from None
        if not isinstance(raw, dict):
            raise ModelLoadError(_TOK_CONFIG, "must be a JSON object")
        cfg = raw
        if "chat_template" in cfg and not isinstance(cfg["chat_template"], str | None):
            raise ModelLoadError(_TOK_CONFIG, "must be a string", field="chat_template")
    if config is None and (path / "config.json").is_file():
        config = load_config(path)
    eos = list(config.eos_token_ids) if config is not None else []
    eos += [i for i in _generation_eos(path) if i not in eos]
    try:
        tok = Tokenizer(proto, cfg, eos)
    except (RuntimeError, OSError) as exc:
        raise ModelLoadError(_SP_FILE, f"not a sentencepiece model: {exc}") from None
    if config is not None and tok.vocab_size > config.vocab_size:
        raise ModelLoadError(
            _SP_FILE, f"tokenizer has {tok.vocab_size} pieces, more than the model's "
                      f"vocab_size {config.vocab_size}")
    return tok
