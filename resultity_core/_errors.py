"""The error family of resultity_core: one base class, each subclass named for what went wrong."""

from __future__ import annotations

__all__ = ["CanonicalEncodingError", "ResultityError"]


class ResultityError(Exception):
    """Base of every error raised by resultity_core."""


class CanonicalEncodingError(ResultityError, ValueError):
    """A value cannot be put in canonical form; ``path`` names where (``models[2].files[0].size``)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        where = path or "<root>"
        super().__init__(f"{where}: {reason}")
