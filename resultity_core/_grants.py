"""Signed messages between the roles: ``Command``, ``NodeGrant`` and ``Receipt``.

* ``Command`` — network -> node instruction, signed by the trust root's ``network`` role; the
  node checks it with ``NodeTrustState.accept_command`` (right node, fresh nonce, not expired).
* ``NodeGrant`` — an account binds a node's public key to itself; signed by the *account's*
  key, so it is verified against that key (``verify_grant``), not the trust root.
* ``Receipt`` — the node's signed usage record of one job; verified against the node's public
  key (``verify_receipt``).

Identifiers (node, account, job ids) are 1-128 characters of ``[A-Za-z0-9._:-]``; a node's id
is conventionally its key id. Same strictness and conventions as ``_formats``.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import attrs

from ._envelope import Envelope, check_payload_type, sign_envelope, verify_signatures
from ._errors import ExpiredError, FutureDatedError, PayloadFormatError
from ._fields import Fields
from ._formats import NAME, check_canonical
from ._keys import PublicKey, SecretKey

__all__ = [
    "DEFAULT_SKEW",
    "Command",
    "NodeGrant",
    "Receipt",
    "sign_grant",
    "sign_receipt",
    "verify_grant",
    "verify_receipt",
]

DEFAULT_SKEW = 300
IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
NONCE = re.compile(r"[A-Za-z0-9_-]{16,128}")
ACTION = re.compile(r"[a-z][a-z0-9_.-]*")


def check_time_window(
    what: str, issued_at: int, expires_at: int | None, now: int, skew: int
) -> None:
    """Raise ExpiredError when ``now >= expires_at`` and FutureDatedError when
    ``issued_at > now + skew``; return None otherwise."""
    if expires_at is not None and now >= expires_at:
        raise ExpiredError(f"{what} expired at {expires_at} (now {now})")
    if issued_at > now + skew:
        raise FutureDatedError(
            f"{what} issued at {issued_at}, {issued_at - now} s in the future (skew {skew} s)"
        )


@attrs.frozen
class Command:
    """A network -> node instruction (``_type`` "command"); ``args`` is any JSON object."""

    TYPE: ClassVar[str] = "command"

    node_id: str
    nonce: str
    issued_at: int
    expires_at: int
    action: str
    args: dict[str, Any] = attrs.field(factory=dict)

    def to_payload(self) -> dict[str, Any]:
        """Return the canonical JSON form."""
        return {
            "_type": self.TYPE,
            "node_id": self.node_id,
            "nonce": self.nonce,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "action": self.action,
            "args": dict(self.args),
        }

    @classmethod
    def from_payload(cls, obj: object) -> Command:
        """Parse and validate; raises PayloadFormatError naming the first bad field."""
        check_canonical(obj)
        f = Fields(obj)
        f.type_tag(cls.TYPE)
        node_id = f.text("node_id", pattern=IDENT, max_len=128)
        nonce = f.text("nonce", pattern=NONCE, max_len=128)
        issued_at, expires_at = f.window()
        action = f.text("action", pattern=ACTION, max_len=64)
        args = f.sub("args").obj
        f.done()
        return cls(node_id, nonce, issued_at, expires_at, action, dict(args))


@attrs.frozen
class NodeGrant:
    """An account's statement that a node key belongs to it (``_type`` "node-grant")."""

    TYPE: ClassVar[str] = "node-grant"

    account_id: str
    node_public: PublicKey
    issued_at: int
    expires_at: int

    @property
    def node_keyid(self) -> str:
        """The key id of the granted node key."""
        return self.node_public.keyid

    def to_payload(self) -> dict[str, Any]:
        """Return the canonical JSON form (``node_keyid`` is included for readers)."""
        return {
            "_type": self.TYPE,
            "account_id": self.account_id,
            "node_keyid": self.node_keyid,
            "node_public": self.node_public.hex,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
        }

    @classmethod
    def from_payload(cls, obj: object) -> NodeGrant:
        """Parse and validate; raises PayloadFormatError naming the first bad field."""
        check_canonical(obj)
        f = Fields(obj)
        f.type_tag(cls.TYPE)
        account_id = f.text("account_id", pattern=IDENT, max_len=128)
        node_keyid = f.keyid("node_keyid")
        public = PublicKey.from_hex(f.raw("node_public"), f.where("node_public"))
        if public.keyid != node_keyid:
            raise PayloadFormatError(f.where("node_keyid"), "is not the key id of node_public")
        issued_at, expires_at = f.window()
        f.done()
        return cls(account_id, public, issued_at, expires_at)


def sign_grant(grant: NodeGrant, account_key: SecretKey) -> Envelope:
    """Return the grant's envelope signed by the account key."""
    return sign_envelope(grant.to_payload(), [account_key])


def verify_grant(
    envelope: Envelope, account_public: PublicKey, now: int, *, skew: int = DEFAULT_SKEW
) -> NodeGrant:
    """Return the grant when ``account_public`` signed it and it is valid at ``now``.

    Raises WrongPayloadTypeError, a SignatureVerificationError (role "account"),
    PayloadFormatError, ExpiredError or FutureDatedError.
    """
    check_payload_type(envelope, NodeGrant.TYPE)
    _verify_single(envelope, account_public, "account")
    grant = NodeGrant.from_payload(envelope.signed)
    check_time_window("node grant", grant.issued_at, grant.expires_at, now, skew)
    return grant


@attrs.frozen
class Receipt:
    """A node's signed usage record of one job (``_type`` "receipt")."""

    TYPE: ClassVar[str] = "receipt"

    job_id: str
    node_id: str
    model: str
    request_hash: str
    output_hash: str
    prompt_tokens: int
    completion_tokens: int
    issued_at: int

    def to_payload(self) -> dict[str, Any]:
        """Return the canonical JSON form."""
        return {"_type": self.TYPE, **attrs.asdict(self)}

    @classmethod
    def from_payload(cls, obj: object) -> Receipt:
        """Parse and validate; raises PayloadFormatError naming the first bad field."""
        check_canonical(obj)
        f = Fields(obj)
        f.type_tag(cls.TYPE)
        out = cls(
            f.text("job_id", pattern=IDENT, max_len=128),
            f.text("node_id", pattern=IDENT, max_len=128),
            f.text("model", pattern=NAME, max_len=128),
            f.digest("request_hash"),
            f.digest("output_hash"),
            f.integer("prompt_tokens", maximum=1 << 32),
            f.integer("completion_tokens", maximum=1 << 32),
            f.integer("issued_at"),
        )
        f.done()
        return out


def sign_receipt(receipt: Receipt, node_key: SecretKey) -> Envelope:
    """Return the receipt's envelope signed by the node key."""
    return sign_envelope(receipt.to_payload(), [node_key])


def verify_receipt(
    envelope: Envelope, node_public: PublicKey, *, expected_node_id: str | None = None
) -> Receipt:
    """Return the receipt when ``node_public`` signed it.

    Raises WrongPayloadTypeError, a SignatureVerificationError (role "node"),
    PayloadFormatError, or PayloadFormatError on ``node_id`` when it is not
    ``expected_node_id`` (when given).
    """
    check_payload_type(envelope, Receipt.TYPE)
    _verify_single(envelope, node_public, "node")
    receipt = Receipt.from_payload(envelope.signed)
    if expected_node_id is not None and receipt.node_id != expected_node_id:
        raise PayloadFormatError("node_id", f"expected {expected_node_id!r}")
    return receipt


def _verify_single(envelope: Envelope, public: PublicKey, role: str) -> None:
    verify_signatures(
        envelope,
        keys={public.keyid: public},
        role_keyids=(public.keyid,),
        threshold=1,
        role=role,
        context=f"{envelope.payload_type} by {role} key {public.keyid[:12]}",
    )
