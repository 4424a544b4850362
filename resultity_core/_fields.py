"""Strict field readers for the signed formats: every refusal names the field's path.

``Fields`` wraps one JSON object; each accessor takes a key, checks type and range, and
remembers the key; ``done()`` refuses any key that was not read (the formats are strict:
unknown fields are an error, so a node never silently ignores a rule it does not understand).
"""

from __future__ import annotations

import re
from typing import Any

from ._errors import PayloadFormatError

__all__ = ["Fields", "join_path"]

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_INT = 2**63 - 1


def join_path(path: str, key: str) -> str:
    """Return ``path.key`` (or ``key`` at the top)."""
    return f"{path}.{key}" if path else key


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


class Fields:
    """Typed, path-naming access to the fields of one JSON object."""

    def __init__(self, obj: object, path: str = "") -> None:
        if not isinstance(obj, dict):
            raise PayloadFormatError(path, f"expected an object, got {_kind(obj)}")
        self.obj: dict[str, Any] = obj
        self.path = path
        self._seen: set[str] = set()

    def _get(self, key: str, *, optional: bool = False) -> Any:
        self._seen.add(key)
        if key not in self.obj:
            if optional:
                return None
            raise PayloadFormatError(join_path(self.path, key), "missing")
        return self.obj[key]

    def where(self, key: str) -> str:
        """Return the path of ``key`` in this object."""
        return join_path(self.path, key)

    def type_tag(self, expected: str) -> None:
        """Check ``_type`` equals ``expected``."""
        value = self._get("_type")
        if value != expected:
            raise PayloadFormatError(self.where("_type"), f"expected {expected!r}, got {value!r}")

    def integer(self, key: str, *, minimum: int = 0, maximum: int = _MAX_INT) -> int:
        """Return an integer field (never a bool or float) in ``[minimum, maximum]``."""
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise PayloadFormatError(self.where(key), f"expected an integer, got {_kind(value)}")
        if not minimum <= value <= maximum:
            raise PayloadFormatError(
                self.where(key), f"must be between {minimum} and {maximum}, got {value}"
            )
        return value

    def boolean(self, key: str) -> bool:
        """Return a boolean field."""
        value = self._get(key)
        if not isinstance(value, bool):
            raise PayloadFormatError(self.where(key), f"expected true or false, got {_kind(value)}")
        return value

    def text(
        self, key: str, *, pattern: re.Pattern[str] | None = None, max_len: int = 256
    ) -> str:
        """Return a non-empty string field, at most ``max_len`` long, matching ``pattern``."""
        value = self._get(key)
        if not isinstance(value, str):
            raise PayloadFormatError(self.where(key), f"expected a string, got {_kind(value)}")
        if not value or len(value) > max_len:
            raise PayloadFormatError(self.where(key), f"must be 1 to {max_len} characters")
        if pattern is not None and not pattern.fullmatch(value):
            raise PayloadFormatError(self.where(key), f"{value!r} does not match {pattern.pattern}")
        return value

    def digest(self, key: str) -> str:
        """Return a ``sha256:<64 lowercase hex>`` field."""
        value = self._get(key)
        if not isinstance(value, str) or not _DIGEST.fullmatch(value):
            raise PayloadFormatError(self.where(key), "expected sha256:<64 lowercase hex>")
        return value

    def keyid(self, key: str) -> str:
        """Return a key id field (64 lowercase hex, no prefix)."""
        value = self._get(key)
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            raise PayloadFormatError(self.where(key), "expected a key id (64 lowercase hex)")
        return value

    def raw(self, key: str, *, optional: bool = False) -> Any:
        """Return a field unchecked (the caller validates it)."""
        return self._get(key, optional=optional)

    def sub(self, key: str) -> Fields:
        """Return the readers of an object-valued field."""
        return Fields(self._get(key), self.where(key))

    def items(self, key: str, *, min_len: int = 0, max_len: int = 10_000) -> list[tuple[str, Any]]:
        """Return ``(path, item)`` for each item of a list-valued field."""
        value = self._get(key)
        if not isinstance(value, list):
            raise PayloadFormatError(self.where(key), f"expected a list, got {_kind(value)}")
        if not min_len <= len(value) <= max_len:
            raise PayloadFormatError(
                self.where(key), f"must have {min_len} to {max_len} items, has {len(value)}"
            )
        return [(f"{self.where(key)}[{i}]", item) for i, item in enumerate(value)]

    def window(self) -> tuple[int, int]:
        """Return ``(issued_at, expires_at)``; raises PayloadFormatError (naming the field) for
        a bad integer or an ``expires_at`` not later than ``issued_at``."""
        issued_at = self.integer("issued_at")
        expires_at = self.integer("expires_at")
        if expires_at <= issued_at:
            raise PayloadFormatError(self.where("expires_at"), "must be later than issued_at")
        return issued_at, expires_at

    def done(self) -> None:
        """Refuse any field that was not read (strict formats)."""
        extra = sorted(set(self.obj) - self._seen)
        if extra:
            raise PayloadFormatError(self.where(extra[0]), "unknown field")
