"""The trust root (TUF-like): which keys may sign what, and how the root itself rotates.

A root is the signed payload::

    {"_type": "root", "version": N, "expires_at": <unix seconds>,
     "keys": {<keyid>: {"keytype": "ed25519", "public": <hex>}, ...},
     "roles": {"root":    {"keyids": [...], "threshold": t},
               "config":  {...}, "release": {...}, "network": {...}}}

Roles: ``root`` signs roots, ``config`` signs NodeConfig snapshots, ``release`` signs Release
manifests, ``network`` signs Commands. The four roles are required and no others are allowed;
each key id must be the SHA-256 of its public key, and each threshold is between 1 and the
number of the role's keys.

A first root is trusted on first use or by pinning its digest (``load_trusted_root``); later
roots arrive by ``rotate_root``: version exactly N+1, signed by a threshold of the *current*
root role and by a threshold of the *new* root role, not expired. An expired current root may
still be rotated (that is how a node that slept past an expiry recovers).
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ._canonical import canonical_digest
from ._envelope import Envelope, check_payload_type, verify_signatures
from ._errors import ExpiredError, HashMismatchError, PayloadFormatError, RootVersionError
from ._fields import Fields
from ._keys import PublicKey

__all__ = [
    "ROLES",
    "ROOT_TYPE",
    "Role",
    "TrustRoot",
    "load_trusted_root",
    "make_root",
    "rotate_root",
    "verify_envelope",
]

ROOT_TYPE = "root"
ROLES = ("root", "config", "release", "network")


@attrs.frozen
class Role:
    """The key ids allowed to sign for a role and how many distinct ones must."""

    keyids: tuple[str, ...]
    threshold: int

    def to_payload(self) -> dict[str, Any]:
        """Return ``{"keyids": [...], "threshold": t}``."""
        return {"keyids": list(self.keyids), "threshold": self.threshold}


def _frozen_map(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(value))


@attrs.frozen(hash=False)
class TrustRoot:
    """A parsed, validated trust root. Build with ``make_root`` or ``from_payload``."""

    version: int
    expires_at: int
    keys: Mapping[str, PublicKey] = attrs.field(converter=_frozen_map)
    roles: Mapping[str, Role] = attrs.field(converter=_frozen_map)

    def __attrs_post_init__(self) -> None:
        # Every constructed root is valid: re-check it through the payload parser.
        _parse_root(self.to_payload())

    def role(self, name: str) -> Role:
        """Return the role ``name``; raises KeyError for a name not in ROLES."""
        return self.roles[name]

    def is_expired(self, now: int) -> bool:
        """Return True when ``now`` is at or after ``expires_at``."""
        return now >= self.expires_at

    def check_unexpired(self, now: int) -> None:
        """Return None while the root is in force; raises ExpiredError at or after expiry."""
        if self.is_expired(now):
            raise ExpiredError(
                f"trust root v{self.version} expired at {self.expires_at} (now {now})"
            )

    def digest(self) -> str:
        """Return ``sha256:<hex>`` of the canonical payload (what a node may pin)."""
        return canonical_digest(self.to_payload())

    def to_payload(self) -> dict[str, Any]:
        """Return the canonical JSON form (with ``_type`` "root")."""
        return {
            "_type": ROOT_TYPE,
            "version": self.version,
            "expires_at": self.expires_at,
            "keys": {kid: key.to_payload() for kid, key in sorted(self.keys.items())},
            "roles": {name: self.roles[name].to_payload() for name in ROLES if name in self.roles},
        }

    @classmethod
    def from_payload(cls, obj: object) -> TrustRoot:
        """Parse and validate a root payload; raises PayloadFormatError naming the field."""
        return cls(*_parse_root(obj))


def _parse_root(obj: object) -> tuple[int, int, dict[str, PublicKey], dict[str, Role]]:
    f = Fields(obj)
    f.type_tag(ROOT_TYPE)
    version = f.integer("version", minimum=1)
    expires_at = f.integer("expires_at")
    keys_f = f.sub("keys")
    keys: dict[str, PublicKey] = {}
    for kid in list(keys_f.obj):
        key = PublicKey.from_payload(keys_f.raw(kid), keys_f.where(kid))
        if key.keyid != kid:
            raise PayloadFormatError(keys_f.where(kid), "key id is not sha256 of the key")
        keys[kid] = key
    roles_f = f.sub("roles")
    roles: dict[str, Role] = {}
    for name in ROLES:
        rf = roles_f.sub(name)
        keyids: list[str] = []
        for path, kid in rf.items("keyids", min_len=1, max_len=256):
            if not isinstance(kid, str) or kid not in keys:
                raise PayloadFormatError(path, f"{kid!r} is not a key listed in keys")
            if kid in keyids:
                raise PayloadFormatError(path, "key id listed twice")
            keyids.append(kid)
        threshold = rf.integer("threshold", minimum=1, maximum=len(keyids))
        rf.done()
        roles[name] = Role(tuple(sorted(keyids)), threshold)
    roles_f.done()
    f.done()
    return version, expires_at, keys, roles


def make_root(
    *,
    version: int,
    expires_at: int,
    role_keys: Mapping[str, Sequence[PublicKey]],
    thresholds: Mapping[str, int] | None = None,
) -> TrustRoot:
    """Return a validated root giving each role in ROLES the keys in ``role_keys``.

    ``thresholds`` defaults to 1 per role. Raises PayloadFormatError when a role is missing or
    a threshold is out of range.
    """
    keys: dict[str, PublicKey] = {}
    roles: dict[str, Any] = {}
    for name in ROLES:
        listed = role_keys.get(name, ())
        for key in listed:
            keys[key.keyid] = key
        roles[name] = {
            "keyids": sorted({key.keyid for key in listed}),
            "threshold": (thresholds or {}).get(name, 1),
        }
    payload = {
        "_type": ROOT_TYPE,
        "version": version,
        "expires_at": expires_at,
        "keys": {kid: key.to_payload() for kid, key in keys.items()},
        "roles": roles,
    }
    return TrustRoot.from_payload(payload)


def verify_envelope(
    envelope: Envelope, root: TrustRoot, role: str, *, expected_type: str
) -> tuple[str, ...]:
    """Check the payload type and that ``role``'s threshold of ``root`` signed ``envelope``.

    Returns the sorted key ids whose signatures verified. Raises WrongPayloadTypeError, then
    BadSignatureError / UnknownKeyError / ThresholdNotMetError (see ``_envelope``); KeyError
    for a role name not in ROLES.
    """
    check_payload_type(envelope, expected_type)
    return _verify_role(root, envelope, role, f"{expected_type} by root v{root.version}")


def _verify_role(root: TrustRoot, envelope: Envelope, role: str, context: str) -> tuple[str, ...]:
    r = root.role(role)
    return verify_signatures(
        envelope,
        keys=root.keys,
        role_keyids=r.keyids,
        threshold=r.threshold,
        role=role,
        context=context,
    )


def load_trusted_root(
    envelope: Envelope, now: int, *, pinned_digest: str | None = None
) -> TrustRoot:
    """Return the root in ``envelope`` when it is self-signed and unexpired (first use).

    ``pinned_digest`` (``sha256:...`` of the root payload), when given, must match: that is how
    an operator pins the initial root instead of trusting it on first use. Raises
    WrongPayloadTypeError, PayloadFormatError, HashMismatchError, a SignatureVerificationError
    when its own root role's threshold did not sign it, and ExpiredError.
    """
    check_payload_type(envelope, ROOT_TYPE)
    if pinned_digest is not None and envelope.digest() != pinned_digest:
        raise HashMismatchError(
            f"trust root digest {envelope.digest()} is not the pinned {pinned_digest}"
        )
    root = TrustRoot.from_payload(envelope.signed)
    _verify_role(root, envelope, "root", f"root v{root.version} by its own root role")
    root.check_unexpired(now)
    return root


def rotate_root(current: TrustRoot, envelope: Envelope, now: int) -> TrustRoot:
    """Return the next root when ``envelope`` is a valid rotation of ``current``.

    Checks, in order: payload type and format; a threshold of ``current``'s root role signed
    it; its version is exactly ``current.version + 1`` (RootVersionError otherwise, covering
    both a skipped version and a rollback); a threshold of its own root role signed it; it is
    not expired at ``now`` (ExpiredError).
    """
    check_payload_type(envelope, ROOT_TYPE)
    new = TrustRoot.from_payload(envelope.signed)
    _verify_role(current, envelope, "root",
                 f"root v{new.version} by the root keys of v{current.version}")
    if new.version != current.version + 1:
        raise RootVersionError(
            f"root v{new.version} cannot follow v{current.version}: "
            f"versions must be consecutive (expected v{current.version + 1})"
        )
    _verify_role(new, envelope, "root", f"root v{new.version} by its own root keys")
    new.check_unexpired(now)
    return new
