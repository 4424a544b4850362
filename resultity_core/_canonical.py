"""Canonical encoding: the one deterministic byte form of everything that is signed or hashed.

JSON with sorted keys, UTF-8, no insignificant whitespace, and only these types: ``dict`` with
``str`` keys, ``list``/``tuple``, ``str``, ``int``, ``bool`` and ``None``. Floats are refused
everywhere (their text form is not portable); signed payloads use integers or decimal strings.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ._errors import CanonicalEncodingError

__all__ = [
    "DIGEST_PREFIX",
    "canonical_bytes",
    "canonical_digest",
    "check_canonical_value",
    "sha256_digest",
]

DIGEST_PREFIX = "sha256:"

_ENCODER = json.JSONEncoder(
    ensure_ascii=False,
    allow_nan=False,
    sort_keys=True,
    separators=(",", ":"),
)


def _check(value: Any, path: str) -> None:
    # bool is a subclass of int and is allowed; float is refused even when integral.
    if value is None or isinstance(value, (bool, int, str)):
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise CanonicalEncodingError(
                    path, "string is not valid UTF-8 (lone surrogate)"
                ) from exc
        return
    if isinstance(value, float):
        raise CanonicalEncodingError(
            path, f"floats are not allowed in canonical form (got {value!r})"
        )
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CanonicalEncodingError(
                    path, f"object keys must be strings (got {type(key).__name__} {key!r})"
                )
            _check(item, f"{path}.{key}" if path else key)
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check(item, f"{path}[{index}]")
        return
    raise CanonicalEncodingError(path, f"type {type(value).__name__} has no canonical form")


def check_canonical_value(value: Any) -> None:
    """Return None when ``value`` has a canonical form, without encoding it.

    Raises CanonicalEncodingError naming the path of the first value that has none: a float
    (NaN and infinities included), a non-string key, or a non-JSON type.
    """
    _check(value, "")


def canonical_bytes(value: Any) -> bytes:
    """Return the canonical UTF-8 JSON bytes of ``value``.

    Raises CanonicalEncodingError as ``check_canonical_value``.
    """
    _check(value, "")
    return _ENCODER.encode(value).encode("utf-8")


def sha256_digest(data: bytes) -> str:
    """Return ``sha256:<hex>`` of raw bytes."""
    return DIGEST_PREFIX + hashlib.sha256(data).hexdigest()


def canonical_digest(value: Any) -> str:
    """Return ``sha256:<hex>`` of the canonical bytes of ``value`` (raises as canonical_bytes)."""
    return sha256_digest(canonical_bytes(value))
