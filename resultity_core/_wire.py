"""Node <-> Network wire messages: frozen attrs types with a canonical JSON form.

Every message becomes a JSON object with a ``"_type"`` tag (``to_payload``), is checked
strictly when built or parsed (``from_payload``), and encodes to canonical bytes
(``to_bytes``). Integers only: durations and deadlines are milliseconds. Validation errors are
``WireMessageError`` whose ``field`` names the offending field (``capabilities.models[1]``).
Unknown payload fields are ignored so that a newer peer can add fields; missing or mistyped
known fields are refused. ``decode_message`` dispatches on the tag.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any, ClassVar, Self, TypeVar

import attrs

from ._canonical import canonical_bytes, check_canonical_value
from ._errors import CanonicalEncodingError, WireMessageError

__all__ = [
    "JOB_EVENT_KINDS",
    "Capabilities",
    "Challenge",
    "ChallengeResponse",
    "Heartbeat",
    "JobEvent",
    "JobUsage",
    "Lease",
    "LeaseBatch",
    "LeaseRequest",
    "ReceiptSubmit",
    "RegisterRequest",
    "WireMessage",
    "decode_message",
    "message_from_bytes",
]

JOB_EVENT_KINDS = ("token", "done", "error")
_FINISH_REASONS = ("stop", "length", "content_filter", "tool_calls", "function_call")
_MAX_ID = 256
_MAX_WAIT_MS = 600_000
_T = TypeVar("_T")


# --- checks (each names the field it refuses) -----------------------------------------------


def _fail(field: str, reason: str) -> WireMessageError:
    return WireMessageError(field, reason)


def _str(value: object, field: str, *, empty: bool = False, max_len: int = _MAX_ID) -> None:
    if not isinstance(value, str):
        raise _fail(field, f"must be a string, got {type(value).__name__}")
    if not value and not empty:
        raise _fail(field, "must not be empty")
    if len(value) > max_len:
        raise _fail(field, f"must be at most {max_len} characters")


def _int(value: object, field: str, *, minimum: int = 0, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(field, f"must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise _fail(field, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise _fail(field, f"must be <= {maximum}, got {value}")


def _hex(value: object, field: str, nbytes: int | None = None, *, min_bytes: int = 1) -> None:
    _str(value, field, max_len=4096)
    assert isinstance(value, str)
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise _fail(field, "must be hexadecimal") from None
    if value != raw.hex():
        raise _fail(field, "must be lowercase hexadecimal")
    if nbytes is not None and len(raw) != nbytes:
        raise _fail(field, f"must encode {nbytes} bytes, got {len(raw)}")
    if len(raw) < min_bytes:
        raise _fail(field, f"must encode at least {min_bytes} bytes")


def _digest(value: object, field: str) -> None:
    _str(value, field)
    assert isinstance(value, str)
    if not value.startswith("sha256:"):
        raise _fail(field, "must be 'sha256:<64 hex digits>'")
    _hex(value[len("sha256:") :], field, 32)


def _json_object(value: object, field: str) -> None:
    if not isinstance(value, dict):
        raise _fail(field, f"must be a JSON object, got {type(value).__name__}")
    try:
        check_canonical_value(value)
    except CanonicalEncodingError as exc:
        raise _fail(f"{field}.{exc.path}" if exc.path else field, exc.reason) from None


def _tuple_of(value: object, field: str, check: Any) -> None:
    if not isinstance(value, tuple):
        raise _fail(field, f"must be a list, got {type(value).__name__}")
    for index, item in enumerate(value):
        check(item, f"{field}[{index}]")


def _choice(value: object, field: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _fail(field, f"must be one of {', '.join(choices)}; got {value!r}")


def _listify(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


def _copy_json(value: object) -> object:
    return copy.deepcopy(value) if isinstance(value, dict | list) else value


# --- base -----------------------------------------------------------------------------------


class WireMessage:
    """Base of the tagged messages: ``TYPE`` is the ``_type`` tag, ``FIELDS`` the payload keys.

    ``OPTIONAL`` maps keys that may be absent to their default.
    """

    TYPE: ClassVar[str]
    FIELDS: ClassVar[tuple[str, ...]]
    OPTIONAL: ClassVar[Mapping[str, object]] = {}

    def to_payload(self) -> dict[str, Any]:
        """Return the JSON object form, ``_type`` tag included (lists, not tuples)."""
        out: dict[str, Any] = {"_type": self.TYPE}
        for name in self.FIELDS:
            out[name] = _to_json(getattr(self, name))
        return out

    def to_bytes(self) -> bytes:
        """Return the canonical bytes of ``to_payload()``."""
        return canonical_bytes(self.to_payload())

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Self:
        """Return the message parsed from its JSON object form.

        Raises WireMessageError naming the field: wrong or missing ``_type``, a missing
        field, or a field of the wrong type or range.
        """
        if not isinstance(payload, Mapping):
            raise _fail("<root>", f"must be a JSON object, got {type(payload).__name__}")
        if payload.get("_type") != cls.TYPE:
            raise _fail("_type", f"must be {cls.TYPE!r}, got {payload.get('_type')!r}")
        kwargs: dict[str, Any] = {}
        for name in cls.FIELDS:
            if name in payload:
                kwargs[name] = cls._parse_field(name, payload[name])
            elif name in cls.OPTIONAL:
                kwargs[name] = cls.OPTIONAL[name]
            else:
                raise _fail(name, "is missing")
        return cls(**kwargs)

    @classmethod
    def _parse_field(cls, name: str, value: object) -> object:
        return _copy_json(_listify(value))


def _to_json(value: object) -> object:
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, Capabilities | JobUsage):
        return value.to_payload()
    return _copy_json(value)


# --- nested values --------------------------------------------------------------------------


@attrs.frozen
class Capabilities:
    """What a node can run: approved model names, the largest batch, the device kind."""

    models: tuple[str, ...]
    max_batch: int
    device: str

    def __attrs_post_init__(self) -> None:
        _tuple_of(self.models, "models", _str)
        _int(self.max_batch, "max_batch", minimum=1, maximum=1 << 16)
        _str(self.device, "device", max_len=64)

    def to_payload(self) -> dict[str, Any]:
        """Return the JSON object form."""
        return {"models": list(self.models), "max_batch": self.max_batch, "device": self.device}

    @classmethod
    def from_payload(cls, payload: object, field: str = "capabilities") -> Capabilities:
        """Return the parsed value; raises WireMessageError naming ``field.<key>``."""
        return _nested(cls, payload, field, ("models", "max_batch", "device"))


@attrs.frozen
class JobUsage:
    """Token counts of one job."""

    prompt_tokens: int
    completion_tokens: int

    def __attrs_post_init__(self) -> None:
        _int(self.prompt_tokens, "prompt_tokens")
        _int(self.completion_tokens, "completion_tokens")

    @property
    def total_tokens(self) -> int:
        """Return prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def to_payload(self) -> dict[str, Any]:
        """Return the JSON object form."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}

    @classmethod
    def from_payload(cls, payload: object, field: str = "usage") -> JobUsage:
        """Return the parsed value; raises WireMessageError naming ``field.<key>``."""
        return _nested(cls, payload, field, ("prompt_tokens", "completion_tokens"))


def _nested(cls: type[_T], payload: object, field: str, keys: tuple[str, ...]) -> _T:
    if not isinstance(payload, Mapping):
        raise _fail(field, f"must be a JSON object, got {type(payload).__name__}")
    kwargs: dict[str, Any] = {}
    for key in keys:
        if key not in payload:
            raise _fail(f"{field}.{key}", "is missing")
        kwargs[key] = _listify(payload[key])
    try:
        return cls(**kwargs)
    except WireMessageError as exc:
        raise _fail(f"{field}.{exc.field}", exc.reason) from None


# --- messages -------------------------------------------------------------------------------


@attrs.frozen
class RegisterRequest(WireMessage):
    """Node -> Network: admit this node key, bound to an account by the signed ``grant``."""

    TYPE: ClassVar[str] = "register_request"
    FIELDS: ClassVar[tuple[str, ...]] = ("node_public_key", "grant", "capabilities")

    node_public_key: str
    grant: dict[str, Any]
    capabilities: Capabilities

    def __attrs_post_init__(self) -> None:
        _hex(self.node_public_key, "node_public_key", 32)
        _json_object(self.grant, "grant")
        if not isinstance(self.capabilities, Capabilities):
            raise _fail("capabilities", "must be Capabilities")

    @classmethod
    def _parse_field(cls, name: str, value: object) -> object:
        if name == "capabilities":
            return Capabilities.from_payload(value)
        return super()._parse_field(name, value)


@attrs.frozen
class Challenge(WireMessage):
    """Network -> Node: sign this nonce with the node key to prove you hold it."""

    TYPE: ClassVar[str] = "challenge"
    FIELDS: ClassVar[tuple[str, ...]] = ("nonce",)

    nonce: str

    def __attrs_post_init__(self) -> None:
        _hex(self.nonce, "nonce", min_bytes=16)


@attrs.frozen
class ChallengeResponse(WireMessage):
    """Node -> Network: Ed25519 signature (hex) over the nonce's bytes."""

    TYPE: ClassVar[str] = "challenge_response"
    FIELDS: ClassVar[tuple[str, ...]] = ("node_id", "signature")

    node_id: str
    signature: str

    def __attrs_post_init__(self) -> None:
        _str(self.node_id, "node_id")
        _hex(self.signature, "signature", 64)


@attrs.frozen
class Heartbeat(WireMessage):
    """Node -> Network: liveness, applied config, runtime version and load.

    ``update_status`` is the node's last software-update outcome in words (``None`` when it
    has nothing to report), so that a refused or failed update is visible to operators.
    """

    TYPE: ClassVar[str] = "heartbeat"
    FIELDS: ClassVar[tuple[str, ...]] = (
        "node_id",
        "seq",
        "config_hash",
        "runtime_version",
        "active_jobs",
        "free_slots",
        "status",
        "update_status",
    )
    OPTIONAL: ClassVar[Mapping[str, object]] = {"config_hash": None, "update_status": None}

    node_id: str
    seq: int
    config_hash: str | None
    runtime_version: str
    active_jobs: int
    free_slots: int
    status: str
    update_status: str | None = None

    def __attrs_post_init__(self) -> None:
        _str(self.node_id, "node_id")
        _int(self.seq, "seq")
        if self.config_hash is not None:
            _digest(self.config_hash, "config_hash")
        _str(self.runtime_version, "runtime_version", max_len=64)
        _int(self.active_jobs, "active_jobs")
        _int(self.free_slots, "free_slots")
        _str(self.status, "status", max_len=64)
        if self.update_status is not None:
            _str(self.update_status, "update_status", empty=True, max_len=1000)


@attrs.frozen
class LeaseRequest(WireMessage):
    """Node -> Network: long poll for up to ``max_jobs`` jobs, waiting at most ``wait_ms``."""

    TYPE: ClassVar[str] = "lease_request"
    FIELDS: ClassVar[tuple[str, ...]] = ("node_id", "max_jobs", "wait_ms")

    node_id: str
    max_jobs: int
    wait_ms: int

    def __attrs_post_init__(self) -> None:
        _str(self.node_id, "node_id")
        _int(self.max_jobs, "max_jobs", minimum=1, maximum=1 << 16)
        _int(self.wait_ms, "wait_ms", maximum=_MAX_WAIT_MS)


@attrs.frozen
class Lease(WireMessage):
    """Network -> Node: one job to run; ``deadline_ms`` is a Unix time in milliseconds."""

    TYPE: ClassVar[str] = "lease"
    FIELDS: ClassVar[tuple[str, ...]] = ("job_id", "model", "request", "deadline_ms")

    job_id: str
    model: str
    request: dict[str, Any]
    deadline_ms: int

    def __attrs_post_init__(self) -> None:
        _str(self.job_id, "job_id")
        _str(self.model, "model")
        _json_object(self.request, "request")
        _int(self.deadline_ms, "deadline_ms")


@attrs.frozen
class LeaseBatch(WireMessage):
    """Network -> Node: the answer to a LeaseRequest (empty when the wait ran out)."""

    TYPE: ClassVar[str] = "lease_batch"
    FIELDS: ClassVar[tuple[str, ...]] = ("leases",)

    leases: tuple[Lease, ...]

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.leases, tuple) or not all(
            isinstance(lease, Lease) for lease in self.leases
        ):
            raise _fail("leases", "must be a list of Lease")

    def to_payload(self) -> dict[str, Any]:
        """Return the JSON object form, each lease with its own ``_type`` tag."""
        return {"_type": self.TYPE, "leases": [lease.to_payload() for lease in self.leases]}

    @classmethod
    def _parse_field(cls, name: str, value: object) -> object:
        if not isinstance(value, list):
            raise _fail(name, f"must be a list, got {type(value).__name__}")
        leases = []
        for index, item in enumerate(value):
            try:
                leases.append(Lease.from_payload(item))
            except WireMessageError as exc:
                raise _fail(f"leases[{index}].{exc.field}", exc.reason) from None
        return tuple(leases)


@attrs.frozen
class JobEvent(WireMessage):
    """Node -> Network: one step of a job's output stream.

    ``kind`` is ``token`` (a text delta and its token ids), ``done`` (``finish_reason`` and
    ``usage`` required) or ``error`` (``error`` message required). ``seq`` counts from 0 per
    job so the Network can drop duplicates and detect gaps. ``index`` is the choice index when
    a request asks for ``n > 1``. ``logprobs`` is opaque canonical JSON (no floats: the engine
    sends decimal strings).
    """

    TYPE: ClassVar[str] = "job_event"
    FIELDS: ClassVar[tuple[str, ...]] = (
        "job_id",
        "seq",
        "kind",
        "index",
        "text",
        "token_ids",
        "finish_reason",
        "error",
        "usage",
        "logprobs",
    )
    OPTIONAL: ClassVar[Mapping[str, object]] = {
        "index": 0,
        "text": "",
        "token_ids": (),
        "finish_reason": None,
        "error": None,
        "usage": None,
        "logprobs": None,
    }

    job_id: str
    seq: int
    kind: str
    index: int = 0
    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    error: str | None = None
    usage: JobUsage | None = None
    logprobs: tuple[dict[str, Any], ...] | None = None

    def __attrs_post_init__(self) -> None:
        _str(self.job_id, "job_id")
        _int(self.seq, "seq")
        _choice(self.kind, "kind", JOB_EVENT_KINDS)
        _int(self.index, "index", maximum=1 << 10)
        _str(self.text, "text", empty=True, max_len=1 << 20)
        _tuple_of(self.token_ids, "token_ids", _int)
        if self.finish_reason is not None:
            _choice(self.finish_reason, "finish_reason", _FINISH_REASONS)
        if self.error is not None:
            _str(self.error, "error", max_len=4096)
        if self.usage is not None and not isinstance(self.usage, JobUsage):
            raise _fail("usage", "must be JobUsage")
        if self.logprobs is not None:
            _tuple_of(self.logprobs, "logprobs", _json_object)
        if self.kind == "done":
            if self.finish_reason is None:
                raise _fail("finish_reason", "is required when kind is 'done'")
            if self.usage is None:
                raise _fail("usage", "is required when kind is 'done'")
        elif self.finish_reason is not None:
            raise _fail("finish_reason", f"must be absent when kind is {self.kind!r}")
        if self.kind == "error" and self.error is None:
            raise _fail("error", "is required when kind is 'error'")
        if self.kind != "error" and self.error is not None:
            raise _fail("error", f"must be absent when kind is {self.kind!r}")

    @classmethod
    def _parse_field(cls, name: str, value: object) -> object:
        if name == "usage" and value is not None:
            return JobUsage.from_payload(value)
        return super()._parse_field(name, value)


@attrs.frozen
class ReceiptSubmit(WireMessage):
    """Node -> Network: the node-signed Receipt envelope of one finished job."""

    TYPE: ClassVar[str] = "receipt_submit"
    FIELDS: ClassVar[tuple[str, ...]] = ("receipt",)

    receipt: dict[str, Any]

    def __attrs_post_init__(self) -> None:
        _json_object(self.receipt, "receipt")
        if not isinstance(self.receipt.get("signed"), dict):
            raise _fail("receipt.signed", "must be a JSON object")
        if not isinstance(self.receipt.get("signatures"), list):
            raise _fail("receipt.signatures", "must be a list")


_MESSAGE_TYPES: dict[str, type[WireMessage]] = {
    cls.TYPE: cls
    for cls in (
        RegisterRequest,
        Challenge,
        ChallengeResponse,
        Heartbeat,
        LeaseRequest,
        Lease,
        LeaseBatch,
        JobEvent,
        ReceiptSubmit,
    )
}


def decode_message(payload: Mapping[str, Any]) -> WireMessage:
    """Return the message named by ``payload["_type"]``.

    Raises WireMessageError (field ``_type`` for an unknown tag, else the bad field).
    """
    if not isinstance(payload, Mapping):
        raise _fail("<root>", f"must be a JSON object, got {type(payload).__name__}")
    tag = payload.get("_type")
    cls = _MESSAGE_TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise _fail("_type", f"unknown message type {tag!r}")
    return cls.from_payload(payload)


def _refuse_float(text: str) -> object:
    raise _fail("<root>", f"floats are not allowed on the wire (got {text})")


def message_from_bytes(data: bytes) -> WireMessage:
    """Return the message encoded in JSON ``data`` (canonical or not).

    Raises WireMessageError for invalid UTF-8 or JSON, floats, NaN, or a bad message.
    """
    try:
        payload = json.loads(
            data.decode("utf-8"), parse_float=_refuse_float, parse_constant=_refuse_float
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail("<root>", f"not valid JSON: {exc}") from None
    return decode_message(payload)
