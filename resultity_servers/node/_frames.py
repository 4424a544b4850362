"""The Agent <-> Runtime pipe protocol, sans-IO: length-prefixed canonical JSON frames.

A frame is a 4-byte big-endian length followed by that many bytes of canonical JSON (see
``resultity_core.canonical_bytes``): one object with a ``"_type"`` tag. Both ends check every
frame: the length against a maximum (before reading the body), the JSON (UTF-8, no floats, no
duplicate keys) and the message's fields. Any failure is a ``FrameError``; the reader treats
the peer as broken (the Agent kills and restarts a Runtime that sends one).

Agent -> Runtime: ``load_model``, ``generate``, ``abort``, ``ping``, ``shutdown``.
Runtime -> Agent: ``ready`` (first frame, once), ``model_loaded``, ``pong``, ``token``,
``error``. A job's ``token`` frames end, per choice ``index``, with one that has a
``finish_reason`` (``stop``, ``length`` or ``abort``); the last carries ``usage``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any, ClassVar, Self

import attrs

from resultity_core import CanonicalEncodingError, canonical_bytes, parse_json_strict
from resultity_core import MalformedEnvelopeError as _JSONError

from ._checks import (
    RUNTIME_FINISH_REASONS,
    Check,
    check_bool,
    check_finish,
    check_int,
    check_ints,
    check_obj,
    check_objs,
    check_sampling_field,
    check_str,
    check_usage,
    fail,
    optional,
)
from ._errors import FrameError

__all__ = [
    "DEFAULT_MAX_FRAME",
    "RUNTIME_FINISH_REASONS",
    "Abort",
    "ErrorFrame",
    "FrameDecoder",
    "Generate",
    "LoadModel",
    "ModelLoaded",
    "Ping",
    "Pong",
    "Ready",
    "RuntimeMessage",
    "Shutdown",
    "TokenEvent",
    "decode_frame_body",
    "encode_frame",
]

DEFAULT_MAX_FRAME = 1 << 20
_HEADER = struct.Struct(">I")
_MAX_TEXT = 1 << 20

_REQUIRED: Any = object()


class RuntimeMessage:
    """Base of the frame messages: ``TYPE`` is the tag, ``SPEC`` maps field -> (check, default).

    A default of ``_REQUIRED`` makes the field mandatory. Unknown fields are refused: both ends
    ship in the same package version.
    """

    TYPE: ClassVar[str]
    SPEC: ClassVar[Mapping[str, tuple[Check, Any]]]

    def __attrs_post_init__(self) -> None:
        for name, (check, _default) in self.SPEC.items():
            check(getattr(self, name), name)
        self._check()

    def _check(self) -> None:
        """Cross-field rules of a message (none by default)."""

    def to_payload(self) -> dict[str, Any]:
        """Return the JSON object form with its ``_type`` tag."""
        out: dict[str, Any] = {"_type": self.TYPE}
        for name in self.SPEC:
            out[name] = getattr(self, name)
        return out

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Self:
        """Return the message in ``payload``; raises FrameError naming the bad field."""
        extra = sorted(set(payload) - set(cls.SPEC) - {"_type"})
        if extra:
            raise fail(extra[0], "unknown field")
        kwargs: dict[str, Any] = {}
        for name, (_check, default) in cls.SPEC.items():
            if name in payload:
                kwargs[name] = payload[name]
            elif default is _REQUIRED:
                raise fail(name, "is missing")
            else:
                kwargs[name] = default
        return cls(**kwargs)


@attrs.frozen
class LoadModel(RuntimeMessage):
    """Agent -> Runtime: load the model directory ``path`` (replacing any loaded model)."""

    TYPE: ClassVar[str] = "load_model"
    SPEC: ClassVar[Mapping[str, tuple[Check, Any]]] = {
        "name": (check_str(), _REQUIRED),
        "path": (check_str(4096), _REQUIRED),
        "device": (check_str(64), "cpu"),
        "dtype": (optional(check_str(32)), None),
        "quantization": (optional(check_str(32)), None),
        "backend": (check_str(32), "auto"),
        "max_num_seqs": (check_int(1, 4096), 16),
        "max_model_len": (optional(check_int(1, 1 << 24)), None),
        "kv_cache_bytes": (optional(check_int(1)), None),
    }

    name: str
    path: str
    device: str = "cpu"
    dtype: str | None = None
    quantization: str | None = None
    backend: str = "auto"
    max_num_seqs: int = 16
    max_model_len: int | None = None
    kv_cache_bytes: int | None = None


@attrs.frozen
class Generate(RuntimeMessage):
    """Agent -> Runtime: start job ``job_id`` from ``prompt`` or chat ``messages``."""

    TYPE: ClassVar[str] = "generate"
    SPEC: ClassVar[Mapping[str, tuple[Check, Any]]] = {
        "job_id": (check_str(), _REQUIRED),
        "prompt": (optional(check_str(_MAX_TEXT)), None),
        "messages": (optional(check_objs), None),
        "sampling": (check_sampling_field, _REQUIRED),
    }

    job_id: str
    prompt: str | None
    messages: list[dict[str, Any]] | None
    sampling: dict[str, Any]

    def _check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise fail("prompt", "exactly one of prompt and messages is required")


@attrs.frozen
class Abort(RuntimeMessage):
    """Agent -> Runtime: cancel job ``job_id`` (its choices end with finish_reason abort)."""

    TYPE: ClassVar[str] = "abort"
    SPEC: ClassVar[Mapping[str, tuple[Check, Any]]] = {"job_id": (check_str(), _REQUIRED)}

    job_id: str


@attrs.frozen
class Ping(RuntimeMessage):
    """Agent -> Runtime: health check; the Runtime's main loop answers ``pong`` with ``seq``."""

    TYPE: ClassVar[str] = "ping"
    SPEC: ClassVar[Mapping[str, tuple[Check, Any]]] = {"seq": (check_int(), _REQUIRED)}

    seq: int


@attrs.frozen
class Shutdown(RuntimeMessage):
    """Agent -> Runtime: abort everything and exit 0."""

    TYPE: ClassVar[str] = "shutdown"
    SPEC: ClassVar[Mapping[str, tuple[Check, Any]]] = {}


@attrs.frozen
class Ready(RuntimeMessage):
    """Runtime -> Agent: the first frame; ``sandbox`` says which limits took effect."""

    TYPE: ClassVar[str] = "ready"
    SPEC: ClassVar[Mapping[str, tuple[Check, Any]]] = {
        "pid": (check_int(1), _REQUIRED),
        "version": (check_str(64), _REQUIRED),
        "sandbox": (check_obj, _REQUIRED),
    }

    pid: int
    version: str
    sandbox: dict[str, Any]


@attrs.frozen
class ModelLoaded(RuntimeMessage):
    """Runtime -> Agent: ``name`` is loaded; ``max_seq_len`` is its context limit."""

    TYPE: ClassVar[str] = "model_loaded"
    SPEC: ClassVar[Mapping[str, tuple[Check, Any]]] = {
        "name": (check_str(), _REQUIRED),
        "max_seq_len": (check_int(1), _REQUIRED),
    }

    name: str
    max_seq_len: int


@attrs.frozen
class Pong(RuntimeMessage):
    """Runtime -> Agent: answer to ``ping`` ``seq``; ``active`` unfinished jobs."""

    TYPE: ClassVar[str] = "pong"
    SPEC: ClassVar[Mapping[str, tuple[Check, Any]]] = {
        "seq": (check_int(), _REQUIRED),
        "active": (check_int(), 0),
    }

    seq: int
    active: int = 0


@attrs.frozen
class TokenEvent(RuntimeMessage):
    """Runtime -> Agent: new output of choice ``index`` of job ``job_id``.

    ``logprobs`` entries are ``{"token", "token_id", "logprob", "rank", "top"}`` with logprobs
    as decimal strings (no floats on the pipe).
    """

    TYPE: ClassVar[str] = "token"
    SPEC: ClassVar[Mapping[str, tuple[Check, Any]]] = {
        "job_id": (check_str(), _REQUIRED),
        "index": (check_int(0, 1 << 10), 0),
        "text": (check_str(_MAX_TEXT, empty=True), ""),
        "token_ids": (check_ints, []),
        "finish_reason": (optional(check_finish), None),
        "usage": (optional(check_usage), None),
        "logprobs": (optional(check_objs), None),
    }

    job_id: str
    index: int = 0
    text: str = ""
    token_ids: list[int] = attrs.field(factory=list)
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    logprobs: list[dict[str, Any]] | None = None


@attrs.frozen
class ErrorFrame(RuntimeMessage):
    """Runtime -> Agent: a failure; with a ``job_id`` it ends that job, ``fatal`` the Runtime."""

    TYPE: ClassVar[str] = "error"
    SPEC: ClassVar[Mapping[str, tuple[Check, Any]]] = {
        "job_id": (optional(check_str()), None),
        "message": (check_str(4096, empty=True), _REQUIRED),
        "fatal": (check_bool, False),
    }

    job_id: str | None
    message: str
    fatal: bool = False


_TYPES: dict[str, type[RuntimeMessage]] = {
    cls.TYPE: cls
    for cls in (LoadModel, Generate, Abort, Ping, Shutdown, Ready, ModelLoaded, Pong,
                TokenEvent, ErrorFrame)
}


def encode_frame(message: RuntimeMessage, *, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Return the frame bytes (length prefix + canonical JSON) of ``message``.

    Raises FrameError when the body would exceed ``max_frame`` or has no canonical form.
    """
    try:
        body = canonical_bytes(message.to_payload())
    except CanonicalEncodingError as exc:
        raise fail(exc.path or "<frame>", exc.reason) from None
    if len(body) > max_frame:
        raise fail("<frame>", f"{len(body)} bytes exceed the {max_frame}-byte frame limit")
    return _HEADER.pack(len(body)) + body


def _refuse_float(text: str) -> object:
    raise fail("<frame>", f"floats are not allowed on the pipe (got {text})")


def decode_frame_body(body: bytes) -> RuntimeMessage:
    """Return the message in one frame body; raises FrameError for anything invalid."""
    try:
        payload = parse_json_strict(body)
    except _JSONError as exc:
        raise fail("<frame>", str(exc)) from None
    try:
        canonical_bytes(payload)
    except CanonicalEncodingError as exc:
        raise fail(exc.path or "<frame>", exc.reason) from None
    if not isinstance(payload, dict):
        raise fail("<frame>", "must be a JSON object")
    tag = payload.get("_type")
    cls = _TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise fail("_type", f"unknown message type {tag!r}")
    return cls.from_payload(payload)


class FrameDecoder:
    """Incremental decoder: ``feed(bytes)`` returns the complete messages received so far.

    After a FrameError the decoder is broken (``failed``) and refuses further input: the
    stream cannot be resynchronised, so the peer must be restarted.
    """

    def __init__(self, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self.failed = False
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """How many bytes of an incomplete frame are buffered."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[RuntimeMessage]:
        """Return the messages completed by ``data``; raises FrameError (then ``failed``)."""
        if self.failed:
            raise fail("<frame>", "decoder already failed")
        self._buf += data
        out: list[RuntimeMessage] = []
        try:
            while len(self._buf) >= _HEADER.size:
                (length,) = _HEADER.unpack_from(self._buf)
                if length > self.max_frame:
                    raise fail("<frame>",
                                f"{length} bytes exceed the {self.max_frame}-byte frame limit")
                end = _HEADER.size + length
                if len(self._buf) < end:
                    break
                body = bytes(self._buf[_HEADER.size:end])
                del self._buf[:end]
                out.append(decode_frame_body(body))
        except FrameError:
            self.failed = True
            raise
        return out

