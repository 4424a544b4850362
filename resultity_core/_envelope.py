"""Signed envelopes: ``{"signed": payload, "signatures": [{"keyid": ..., "sig": ...}, ...]}``.

Like python-tuf's ``Metadata``, an envelope is a container around a payload it does not
interpret: ``signed`` is kept exactly as received, so unknown fields survive a round trip and
signatures stay valid. Each ``sig`` is the lowercase hex Ed25519 signature of
``canonical_bytes(signed)``; ``keyid`` is the signer's key id (see ``_keys``).

Counting rule (``verify_signatures``): only *distinct* key ids listed for the role whose
signature verifies count toward the threshold; a key that signs twice counts once; signatures
from keys the role does not list are ignored for counting (as in TUF), and so is a bad
signature when the threshold is reached anyway. Below threshold the error names what was
found, picking the most telling class:

* ``BadSignatureError`` when a key of the role signed something else (tampered payload);
* else ``UnknownKeyError`` when no signature verified and some came from unknown keys;
* else ``ThresholdNotMetError`` (too few signatures, or none).

All three derive from ``SignatureVerificationError``; verification never returns False.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import attrs

from ._canonical import canonical_bytes, canonical_digest, check_canonical_value
from ._errors import (
    BadSignatureError,
    CanonicalEncodingError,
    MalformedEnvelopeError,
    SignatureVerificationError,
    ThresholdNotMetError,
    UnknownKeyError,
    WrongPayloadTypeError,
)
from ._keys import PublicKey, SecretKey

__all__ = [
    "Envelope",
    "Signature",
    "check_payload_type",
    "parse_json_strict",
    "sign_envelope",
    "verify_signatures",
]

_HEX = frozenset("0123456789abcdef")


def _is_hex(value: str, length: int) -> bool:
    return len(value) == length and set(value) <= _HEX


@attrs.frozen
class Signature:
    """One signature: the signer's key id and the hex Ed25519 signature (128 characters)."""

    keyid: str
    sig: str

    def to_payload(self) -> dict[str, str]:
        """Return ``{"keyid": ..., "sig": ...}``."""
        return {"keyid": self.keyid, "sig": self.sig}


def parse_json_strict(data: bytes | str) -> Any:
    """Parse JSON text, refusing duplicate object keys (which parsers resolve differently).

    Returns the parsed value. Floats, NaN and infinities are parsed (as floats) so that the
    canonical check that follows can refuse them naming their path. Raises
    MalformedEnvelopeError (path ``""``) for text that is not UTF-8 JSON.
    """

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise MalformedEnvelopeError("", f"duplicate key {key!r}")
            out[key] = value
        return out

    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, object_pairs_hook=pairs)
    except UnicodeDecodeError:
        raise MalformedEnvelopeError("", "not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise MalformedEnvelopeError(
            "", f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise MalformedEnvelopeError("", "nested too deeply") from None


@attrs.frozen
class Envelope:
    """A payload and its signatures. ``signed`` is the payload exactly as signed/received."""

    signed: Mapping[str, Any]
    signatures: tuple[Signature, ...] = ()

    @property
    def payload_type(self) -> object:
        """The payload's ``_type`` field (None when absent)."""
        return self.signed.get("_type")

    def signed_bytes(self) -> bytes:
        """Return the canonical bytes of the payload: what every signature covers."""
        return canonical_bytes(self.signed)

    def digest(self) -> str:
        """Return ``sha256:<hex>`` of the payload's canonical bytes."""
        return canonical_digest(self.signed)

    def to_payload(self) -> dict[str, Any]:
        """Return the JSON form ``{"signed": ..., "signatures": [...]}``."""
        return {
            "signed": dict(self.signed),
            "signatures": [s.to_payload() for s in self.signatures],
        }

    def to_bytes(self) -> bytes:
        """Return the canonical bytes of the whole envelope."""
        return canonical_bytes(self.to_payload())

    @classmethod
    def from_payload(cls, obj: object) -> Envelope:
        """Parse the JSON form; raises MalformedEnvelopeError naming the offending field."""
        if not isinstance(obj, dict):
            raise MalformedEnvelopeError("", "an envelope is a JSON object")
        extra = sorted(set(obj) - {"signed", "signatures"})
        if extra:
            raise MalformedEnvelopeError(extra[0], "unknown field in envelope")
        signed = obj.get("signed")
        if not isinstance(signed, dict):
            raise MalformedEnvelopeError("signed", "expected the payload object")
        try:
            check_canonical_value(signed)
        except CanonicalEncodingError as exc:
            raise MalformedEnvelopeError(f"signed.{exc.path}", exc.reason) from None
        raw_sigs = obj.get("signatures")
        if not isinstance(raw_sigs, list):
            raise MalformedEnvelopeError("signatures", "expected a list")
        sigs = []
        for i, item in enumerate(raw_sigs):
            path = f"signatures[{i}]"
            if not isinstance(item, dict) or set(item) != {"keyid", "sig"}:
                raise MalformedEnvelopeError(path, 'expected {"keyid": ..., "sig": ...}')
            keyid, sig = item["keyid"], item["sig"]
            if not isinstance(keyid, str) or not _is_hex(keyid, 64):
                raise MalformedEnvelopeError(f"{path}.keyid", "expected 64 lowercase hex")
            if not isinstance(sig, str) or not _is_hex(sig, 128):
                raise MalformedEnvelopeError(f"{path}.sig", "expected 128 lowercase hex")
            sigs.append(Signature(keyid, sig))
        return cls(signed, tuple(sigs))

    @classmethod
    def from_bytes(cls, data: bytes | str) -> Envelope:
        """Parse JSON text (strictly, see parse_json_strict); raises MalformedEnvelopeError."""
        return cls.from_payload(parse_json_strict(data))


def sign_envelope(
    payload: Mapping[str, Any] | Envelope, keys: Iterable[SecretKey]
) -> Envelope:
    """Return an envelope of ``payload`` signed by each of ``keys``.

    Passing an Envelope adds signatures to it (a key that already signed is re-signed, never
    listed twice). Raises CanonicalEncodingError when the payload has no canonical form and
    MalformedEnvelopeError when it is not an object with a string ``_type``.
    """
    env = payload if isinstance(payload, Envelope) else Envelope(dict(payload))
    if not isinstance(env.payload_type, str):
        raise MalformedEnvelopeError("signed._type", "a signed payload needs a string _type")
    message = env.signed_bytes()
    by_id = {s.keyid: s for s in env.signatures}
    for key in keys:
        by_id[key.keyid] = Signature(key.keyid, key.sign(message).hex())
    return Envelope(env.signed, tuple(by_id.values()))


def check_payload_type(envelope: Envelope, expected: str) -> None:
    """Return None when the payload's ``_type`` is ``expected``; raise WrongPayloadTypeError."""
    if envelope.payload_type != expected:
        raise WrongPayloadTypeError(expected, envelope.payload_type)


def verify_signatures(
    envelope: Envelope,
    *,
    keys: Mapping[str, PublicKey],
    role_keyids: Collection[str],
    threshold: int,
    role: str,
    context: str = "",
) -> tuple[str, ...]:
    """Check that distinct valid signatures from ``role_keyids`` reach ``threshold``.

    ``keys`` maps key ids to public keys. Returns the sorted key ids whose signatures verified.
    Raises BadSignatureError, UnknownKeyError or ThresholdNotMetError as described in the
    module docstring; ``context`` prefixes the message (e.g. "root v2 by root v1").
    """
    if threshold < 1:
        raise ValueError("threshold must be at least 1")
    message = envelope.signed_bytes()
    valid: set[str] = set()
    bad: set[str] = set()
    unknown: set[str] = set()
    for s in envelope.signatures:
        public = keys.get(s.keyid) if s.keyid in role_keyids else None
        if public is None:
            unknown.add(s.keyid)
            continue
        if s.keyid in valid:
            continue
        try:
            public.verify(message, bytes.fromhex(s.sig))
        except (BadSignatureError, ValueError):
            bad.add(s.keyid)
        else:
            valid.add(s.keyid)
    if len(valid) >= threshold:
        return tuple(sorted(valid))
    bad -= valid
    cls: type[SignatureVerificationError] = ThresholdNotMetError
    if bad:
        cls = BadSignatureError
    elif not valid and unknown:
        cls = UnknownKeyError
    raise cls(
        role,
        threshold,
        valid=tuple(sorted(valid)),
        unknown=tuple(sorted(unknown)),
        bad=tuple(sorted(bad)),
        context=context,
    )
