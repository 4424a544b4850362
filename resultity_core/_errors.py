"""The error family of resultity_core: one base class, each subclass named for what went wrong."""

from __future__ import annotations

__all__ = [
    "BadSignatureError",
    "CanonicalEncodingError",
    "ExpiredError",
    "FutureDatedError",
    "HashMismatchError",
    "KeyFileError",
    "MalformedEnvelopeError",
    "PayloadFormatError",
    "ReplayError",
    "ResultityError",
    "RollbackError",
    "RootVersionError",
    "RuleViolationError",
    "SignatureVerificationError",
    "ThresholdNotMetError",
    "UnknownKeyError",
    "WrongNodeError",
    "WrongPayloadTypeError",
]


class ResultityError(Exception):
    """Base of every error raised by resultity_core."""


class CanonicalEncodingError(ResultityError, ValueError):
    """A value cannot be put in canonical form; ``path`` names where (``models[2].files[0].size``)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        where = path or "<root>"
        super().__init__(f"{where}: {reason}")


# --- keys, signed envelopes, trust root, formats, node rules (_keys, _envelope, _trust, ...) --


class KeyFileError(ResultityError):
    """A key file is missing, unreadable, not JSON, of the wrong type, truncated or corrupt."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"key file {path}: {reason}")


class PayloadFormatError(ResultityError, ValueError):
    """A payload does not match its format; ``path`` names the field (``models[0].files[1]``)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path or '<payload>'}: {reason}")


class MalformedEnvelopeError(PayloadFormatError):
    """A signed envelope is not ``{"signed": {...}, "signatures": [{"keyid", "sig"}, ...]}``."""


class WrongPayloadTypeError(ResultityError):
    """A signed payload's ``_type`` is not the one the caller asked for."""

    def __init__(self, expected: str, got: object) -> None:
        self.expected = expected
        self.got = got
        super().__init__(f"payload _type is {got!r}, expected {expected!r}")


class SignatureVerificationError(ResultityError):
    """Base of the signature failures; says what was counted.

    ``valid`` are the distinct key ids of ``role`` whose signature verified, ``threshold`` the
    number needed, ``unknown`` the key ids that signed but are not keys of the role, ``bad`` the
    role key ids whose signature did not verify.
    """

    def __init__(
        self,
        role: str,
        threshold: int,
        *,
        valid: tuple[str, ...],
        unknown: tuple[str, ...],
        bad: tuple[str, ...],
        context: str = "",
    ) -> None:
        self.role = role
        self.threshold = threshold
        self.valid = valid
        self.unknown = unknown
        self.bad = bad
        parts = [f"{len(valid)} valid signature(s) of role {role!r}, threshold {threshold}"]
        if bad:
            parts.append("bad signature from " + ", ".join(k[:12] for k in bad))
        if unknown:
            parts.append("unknown key " + ", ".join(k[:12] for k in unknown))
        prefix = f"{context}: " if context else ""
        super().__init__(prefix + self._headline() + " (" + "; ".join(parts) + ")")

    def _headline(self) -> str:
        return "signature verification failed"


class BadSignatureError(SignatureVerificationError):
    """Below threshold and at least one key of the role signed something else (tampering)."""

    def _headline(self) -> str:
        return "bad signature"


class UnknownKeyError(SignatureVerificationError):
    """No valid signature at all; the signatures present are from keys the role does not list."""

    def _headline(self) -> str:
        return "signed only by keys unknown to the role"


class ThresholdNotMetError(SignatureVerificationError):
    """Fewer distinct valid signatures from the role's keys than its threshold."""

    def _headline(self) -> str:
        return "signature threshold not met"


class RootVersionError(ResultityError):
    """A new trust root is not exactly the next version of the current one."""


class RuleViolationError(ResultityError):
    """Base of the node's refusals of a well-signed payload (snapshot, release, command)."""


class HashMismatchError(RuleViolationError):
    """The payload's canonical digest is not the one the node was told to expect."""


class RollbackError(RuleViolationError):
    """A lower version than the one applied, or the same version with different content."""


class ExpiredError(RuleViolationError):
    """The payload (or the trust root) expired at or before ``now`` (freeze attack)."""


class FutureDatedError(RuleViolationError):
    """The payload's issued_at lies further in the future than the allowed clock skew."""


class ReplayError(RuleViolationError):
    """A command's nonce was seen before (or may have been, after the nonce memory was trimmed)."""


class WrongNodeError(RuleViolationError):
    """A command addressed to another node."""
