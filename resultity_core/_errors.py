"""The error family of resultity_core: one base class, each subclass named for what went wrong."""

from __future__ import annotations

__all__ = [
    "AccountExistsError",
    "BadSignatureError",
    "CanonicalEncodingError",
    "ChargeExceedsReservationError",
    "DuplicateReservationError",
    "ExpiredError",
    "FutureDatedError",
    "HashMismatchError",
    "InsufficientCreditsError",
    "InsufficientQuotaError",
    "InternalServerError",
    "InvalidAPIKeyError",
    "InvalidAmountError",
    "InvalidRequestError",
    "InvalidTransitionError",
    "KeyFileError",
    "LedgerError",
    "MalformedEnvelopeError",
    "ModelNotFoundError",
    "NoCapacityError",
    "OpenAIRequestError",
    "PayloadFormatError",
    "RateLimitedError",
    "ReplayError",
    "RequestTooLargeError",
    "ResultityError",
    "RollbackError",
    "RootVersionError",
    "RuleViolationError",
    "SSEEncodingError",
    "SignatureVerificationError",
    "ThresholdNotMetError",
    "UnknownAccountError",
    "UnknownKeyError",
    "UnknownReservationError",
    "WireMessageError",
    "WrongNodeError",
    "WrongPayloadTypeError",
]


class ResultityError(Exception):
    """Base of every error raised by resultity_core."""


class CanonicalEncodingError(ResultityError, ValueError):
    """A value has no canonical form; ``path`` names where (``models[2].files[0].size``)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        where = path or "<root>"
        super().__init__(f"{where}: {reason}")


# --- ledger (resultity_core._ledger) -------------------------------------------------------


class LedgerError(ResultityError):
    """Base of every ledger refusal; the state it was applied to is left unchanged."""


class InvalidAmountError(LedgerError, ValueError):
    """A ledger argument has the wrong type or range; ``field`` names it."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class InsufficientCreditsError(LedgerError):
    """A reservation would take an account's balance below zero."""

    def __init__(self, account: str, balance: int, requested: int) -> None:
        self.account = account
        self.balance = balance
        self.requested = requested
        super().__init__(
            f"account {account!r} has {balance} micro-credits, {requested} were requested"
        )


class UnknownAccountError(LedgerError, KeyError):
    """The ledger has no account with this id."""

    def __str__(self) -> str:
        return f"unknown account {self.args[0]!r}"


class AccountExistsError(LedgerError):
    """An account with this id is already open."""


class UnknownReservationError(LedgerError, KeyError):
    """The ledger has no open reservation with this id (never made, or already settled/released)."""

    def __str__(self) -> str:
        return f"unknown reservation {self.args[0]!r}"


class DuplicateReservationError(LedgerError):
    """A reservation with this id is already open."""


class ChargeExceedsReservationError(LedgerError):
    """A settlement charges more than was reserved (and capping was not asked for)."""


# --- state machines (resultity_core._jobstate) ---------------------------------------------


class InvalidTransitionError(ResultityError):
    """An event is not allowed in the current state of a job or node state machine."""

    def __init__(self, machine: str, state: str, event: str) -> None:
        self.machine = machine
        self.state = state
        self.event = event
        super().__init__(f"{machine}: event {event!r} is not allowed in state {state!r}")


# --- node <-> network wire messages (resultity_core._wire) ----------------------------------


class WireMessageError(ResultityError, ValueError):
    """A wire message payload is malformed; ``field`` names the offending field."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


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


# --- OpenAI protocol and SSE (resultity_core._openai*, resultity_core._sse) ----------------


class OpenAIRequestError(ResultityError):
    """Base of the errors the OpenAI-compatible API answers with an HTTP status and error body.

    ``status`` is the HTTP status, ``type``/``code``/``param``/``message`` fill
    ``{"error": {"message", "type", "param", "code"}}`` (see ``to_error_body``).
    """

    status: int = 500
    error_type: str = "server_error"
    default_code: str | None = None
    default_message: str = "The server had an error while processing your request."

    def __init__(
        self,
        message: str | None = None,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
    ) -> None:
        self.message = message if message is not None else self.default_message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.type = self.error_type
        if status is not None:
            self.status = status
        super().__init__(self.message)

    def to_error_body(self) -> dict[str, dict[str, str | None]]:
        """Return exactly ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(OpenAIRequestError, ValueError):
    """400: the request body is malformed or a value is invalid; ``param`` names the field."""

    status = 400
    error_type = "invalid_request_error"
    default_message = "The request is invalid."


class RequestTooLargeError(OpenAIRequestError):
    """413: the request body exceeds the size limit."""

    status = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"
    default_message = "The request body is too large."


class InvalidAPIKeyError(OpenAIRequestError):
    """401: no API key, or one that matches no account."""

    status = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"
    default_message = "Incorrect API key provided."


class InsufficientQuotaError(OpenAIRequestError):
    """402 (default) or 429: the account has not enough credits for the request's worst case."""

    status = 402
    error_type = "insufficient_quota"
    default_code = "insufficient_quota"
    default_message = "You exceeded your current quota: the account has not enough credits."


class ModelNotFoundError(OpenAIRequestError):
    """404: no approved model has this name."""

    status = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"
    default_message = "The model does not exist."


class RateLimitedError(OpenAIRequestError):
    """429: too many requests; the client may retry later."""

    status = 429
    error_type = "requests"
    default_code = "rate_limit_exceeded"
    default_message = "Rate limit reached; retry later."


class NoCapacityError(OpenAIRequestError):
    """503: no live node can serve the model right now."""

    status = 503
    error_type = "server_error"
    default_code = "no_capacity"
    default_message = "No node can serve this model right now; retry later."


class InternalServerError(OpenAIRequestError):
    """500: a failure on our side (never used for bad input)."""


class SSEEncodingError(ResultityError, ValueError):
    """An SSE field cannot be encoded (a line break or NUL in ``event`` or ``id``, bad retry)."""
