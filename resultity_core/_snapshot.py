"""The node's rules for signed snapshots, releases, commands and root rotation.

``check_node_config`` / ``check_release`` / ``check_command`` are pure checks of one envelope;
``NodeTrustState`` is the node's state object built on them: it remembers the trust root, the
last applied config and release, and the command nonces it has seen. A refused envelope never
changes what is in force; the refusal is kept in ``last_rejection``.

Order of the config checks: trust root not expired; digest equals ``expected_hash`` (when
given); ``config`` role threshold (``_envelope`` counting rule); strict format; not expired at
``now`` (freeze); ``issued_at <= now + skew``; version not lower than the applied one, and the
same version only with the same digest (then the call is an idempotent no-op).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import Any, TypeVar

import attrs

from ._envelope import Envelope
from ._errors import (
    HashMismatchError,
    PayloadFormatError,
    ReplayError,
    ResultityError,
    RollbackError,
    WrongNodeError,
)
from ._fields import Fields
from ._formats import NodeConfig
from ._grants import DEFAULT_SKEW, Command, check_time_window
from ._release import Release
from ._trust import TrustRoot, rotate_root, verify_envelope

__all__ = [
    "EnvelopeInput",
    "NodeTrustState",
    "Rejection",
    "as_envelope",
    "check_command",
    "check_node_config",
    "check_release",
]

EnvelopeInput = Envelope | bytes | str | Mapping[str, Any]
STATE_TYPE = "node-trust-state"


def as_envelope(value: EnvelopeInput) -> Envelope:
    """Return ``value`` as an Envelope (parsing JSON bytes/text or a JSON object).

    Raises MalformedEnvelopeError.
    """
    if isinstance(value, Envelope):
        return value
    if isinstance(value, (bytes, str)):
        return Envelope.from_bytes(value)
    return Envelope.from_payload(dict(value))


def _check_hash(what: str, env: Envelope, expected_hash: str | None) -> str:
    digest = env.digest()
    if expected_hash is not None and digest != expected_hash:
        raise HashMismatchError(f"{what} digest {digest} is not the expected {expected_hash}")
    return digest


def _check_version(
    what: str, version: int, digest: str, applied_version: int | None, applied_hash: str | None
) -> None:
    if applied_version is None:
        return
    if version < applied_version:
        raise RollbackError(f"{what} v{version} is older than the applied v{applied_version}")
    if version == applied_version and applied_hash is not None and digest != applied_hash:
        raise RollbackError(
            f"{what} v{version} differs from the applied v{applied_version} of the same version"
        )


_Versioned = TypeVar("_Versioned", NodeConfig, Release)


def _check_versioned(
    kind: type[_Versioned],
    role: str,
    envelope: EnvelopeInput,
    root: TrustRoot,
    now: int,
    *,
    expected_hash: str | None,
    applied_version: int | None,
    applied_hash: str | None,
    skew: int,
) -> tuple[_Versioned, str]:
    # the rules shared by node configs and releases, in the order of the module docstring
    what = kind.TYPE
    env = as_envelope(envelope)
    root.check_unexpired(now)
    digest = _check_hash(what, env, expected_hash)
    verify_envelope(env, root, role, expected_type=what)
    item = kind.from_payload(env.signed)
    check_time_window(f"{what} v{item.version}", item.issued_at, item.expires_at, now, skew)
    _check_version(what, item.version, digest, applied_version, applied_hash)
    return item, digest


def check_node_config(
    envelope: EnvelopeInput,
    root: TrustRoot,
    now: int,
    *,
    expected_hash: str | None = None,
    applied_version: int | None = None,
    applied_hash: str | None = None,
    skew: int = DEFAULT_SKEW,
) -> tuple[NodeConfig, str]:
    """Return ``(config, node_config_hash)`` when the snapshot passes every node rule.

    Raises MalformedEnvelopeError, ExpiredError (snapshot or trust root), HashMismatchError,
    WrongPayloadTypeError, a SignatureVerificationError, PayloadFormatError,
    FutureDatedError or RollbackError, checked in the order of the module docstring.
    """
    return _check_versioned(
        NodeConfig, "config", envelope, root, now, expected_hash=expected_hash,
        applied_version=applied_version, applied_hash=applied_hash, skew=skew,
    )


def check_release(
    envelope: EnvelopeInput,
    root: TrustRoot,
    now: int,
    *,
    expected_hash: str | None = None,
    applied_version: int | None = None,
    applied_hash: str | None = None,
    skew: int = DEFAULT_SKEW,
) -> tuple[Release, str]:
    """Return ``(release, digest)``: the config rules, applied to the ``release`` role."""
    return _check_versioned(
        Release, "release", envelope, root, now, expected_hash=expected_hash,
        applied_version=applied_version, applied_hash=applied_hash, skew=skew,
    )


def check_command(
    envelope: EnvelopeInput, root: TrustRoot, now: int, *, node_id: str,
    skew: int = DEFAULT_SKEW,
) -> Command:
    """Return the command when the ``network`` role signed it for ``node_id`` and it is current.

    Does not check the nonce (``NodeTrustState.accept_command`` does). Raises
    MalformedEnvelopeError, ExpiredError, WrongPayloadTypeError, a SignatureVerificationError,
    PayloadFormatError, WrongNodeError or FutureDatedError.
    """
    env = as_envelope(envelope)
    root.check_unexpired(now)
    verify_envelope(env, root, "network", expected_type=Command.TYPE)
    command = Command.from_payload(env.signed)
    if command.node_id != node_id:
        raise WrongNodeError(f"command for node {command.node_id!r}, this is {node_id!r}")
    check_time_window(f"command {command.action}", command.issued_at, command.expires_at,
                      now, skew)
    return command


@attrs.frozen
class Rejection:
    """Why the last envelope was refused: what it was, the error, and when."""

    what: str
    error: ResultityError
    at: int

    def __str__(self) -> str:
        return f"{self.what} rejected at {self.at}: {type(self.error).__name__}: {self.error}"


class NodeTrustState:
    """What a node trusts and has applied. Mutable, single-threaded, no I/O, no clock.

    ``current`` is the NodeConfig in force (None before the first), ``current_hash`` its
    digest, ``release`` / ``release_hash`` likewise, ``root`` the trust root. Each ``apply_*`` /
    ``accept_command`` / ``update_root`` either succeeds and updates the state, or raises and
    leaves it unchanged except for ``last_rejection`` (cleared by the next success).

    Nonces: every accepted command's nonce is remembered until the command expires; at most
    ``max_nonces`` are kept, the soonest-expiring forgotten first. ``nonce_floor`` is the latest
    expiry of any forgotten nonce; a command expiring at or before it is refused as a possible
    replay, so forgetting never opens a replay window (even if ``now`` goes backwards).
    """

    def __init__(
        self,
        root: TrustRoot,
        *,
        node_id: str,
        skew: int = DEFAULT_SKEW,
        max_nonces: int = 10_000,
    ) -> None:
        self.root = root
        self.node_id = node_id
        self.skew = skew
        self.max_nonces = max_nonces
        self.current: NodeConfig | None = None
        self.current_hash: str | None = None
        self.current_envelope: Envelope | None = None
        self.release: Release | None = None
        self.release_hash: str | None = None
        self.release_envelope: Envelope | None = None
        self.last_rejection: Rejection | None = None
        self.nonce_floor: int = -1
        self._nonces: dict[str, int] = {}
        self._expiries: list[tuple[int, str]] = []

    def _reject(self, what: str, error: ResultityError, now: int) -> None:
        self.last_rejection = Rejection(what, error, now)

    def apply(
        self, envelope: EnvelopeInput, *, now: int, expected_hash: str | None = None
    ) -> NodeConfig:
        """Apply a NodeConfig snapshot; return the config now in force.

        Re-applying the snapshot in force is a no-op. Raises as ``check_node_config`` (with
        the applied version and hash as the rollback bound); the previous config stays.
        """
        try:
            config, digest = check_node_config(
                envelope, self.root, now, expected_hash=expected_hash,
                applied_version=self.current.version if self.current else None,
                applied_hash=self.current_hash, skew=self.skew,
            )
        except ResultityError as exc:
            self._reject("node-config", exc, now)
            raise
        if digest != self.current_hash:
            self.current, self.current_hash = config, digest
            self.current_envelope = as_envelope(envelope)
        self.last_rejection = None
        return config

    def apply_release(
        self, envelope: EnvelopeInput, *, now: int, expected_hash: str | None = None
    ) -> Release:
        """Apply a Release manifest with the same rules (role ``release``); return it."""
        try:
            release, digest = check_release(
                envelope, self.root, now, expected_hash=expected_hash,
                applied_version=self.release.version if self.release else None,
                applied_hash=self.release_hash, skew=self.skew,
            )
        except ResultityError as exc:
            self._reject("release", exc, now)
            raise
        if digest != self.release_hash:
            self.release, self.release_hash = release, digest
            self.release_envelope = as_envelope(envelope)
        self.last_rejection = None
        return release

    def accept_command(self, envelope: EnvelopeInput, *, now: int) -> Command:
        """Accept a command once; return it. Raises as ``check_command``, or ReplayError."""
        try:
            command = check_command(envelope, self.root, now, node_id=self.node_id,
                                    skew=self.skew)
            self._forget_expired(now)
            if command.nonce in self._nonces:
                raise ReplayError(f"command nonce {command.nonce!r} was already used")
            if command.expires_at <= self.nonce_floor:
                raise ReplayError(
                    f"command nonce {command.nonce!r} cannot be proven fresh (expires at "
                    f"{command.expires_at}, nonces up to {self.nonce_floor} were forgotten)"
                )
        except ResultityError as exc:
            self._reject("command", exc, now)
            raise
        self._nonces[command.nonce] = command.expires_at
        heapq.heappush(self._expiries, (command.expires_at, command.nonce))
        while len(self._nonces) > self.max_nonces:
            self._forget_one()
        self.last_rejection = None
        return command

    def update_root(self, envelope: EnvelopeInput, *, now: int) -> TrustRoot:
        """Rotate to the next trust root (see ``rotate_root``); return it."""
        try:
            new = rotate_root(self.root, as_envelope(envelope), now)
        except ResultityError as exc:
            self._reject("root", exc, now)
            raise
        self.root = new
        self.last_rejection = None
        return new

    def export_state(self) -> dict[str, Any]:
        """Return everything the node must keep across restarts, as a JSON object.

        Persist it (atomically, as privately as the node's key) after every change and give it
        to ``restore`` on start: without it a restarted node would accept a rolled-back
        snapshot or a replayed command.
        """
        return {
            "_type": STATE_TYPE,
            "node_id": self.node_id,
            "root": self.root.to_payload(),
            "config": self.current_envelope.to_payload() if self.current_envelope else None,
            "release": self.release_envelope.to_payload() if self.release_envelope else None,
            "nonces": sorted([n, e] for n, e in self._nonces.items()),
            "nonce_floor": self.nonce_floor,
        }

    @classmethod
    def restore(
        cls, state: Mapping[str, Any], *, skew: int = DEFAULT_SKEW, max_nonces: int = 10_000
    ) -> NodeTrustState:
        """Return the state saved by ``export_state``.

        The saved envelopes are not re-verified (the root may have rotated since): the state
        file is trusted like the node's key file. Raises PayloadFormatError or
        MalformedEnvelopeError when it is damaged.
        """
        f = Fields(dict(state))
        f.type_tag(STATE_TYPE)
        node_id = f.text("node_id", max_len=128)
        out = cls(TrustRoot.from_payload(f.raw("root")), node_id=node_id, skew=skew,
                  max_nonces=max_nonces)
        config = f.raw("config")
        if config is not None:
            env = Envelope.from_payload(config)
            out.current, out.current_hash = NodeConfig.from_payload(env.signed), env.digest()
            out.current_envelope = env
        release = f.raw("release")
        if release is not None:
            env = Envelope.from_payload(release)
            out.release, out.release_hash = Release.from_payload(env.signed), env.digest()
            out.release_envelope = env
        for path, item in f.items("nonces", max_len=10_000_000):
            if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                    or isinstance(item[1], bool) or not isinstance(item[1], int)):
                raise PayloadFormatError(path, "expected [nonce, expires_at]")
            if item[0] in out._nonces:
                raise PayloadFormatError(path, "duplicate nonce")
            out._nonces[item[0]] = item[1]
            out._expiries.append((item[1], item[0]))
        heapq.heapify(out._expiries)
        out.nonce_floor = f.integer("nonce_floor", minimum=-1)
        f.done()
        while len(out._nonces) > out.max_nonces:
            out._forget_one()
        return out

    @property
    def nonce_count(self) -> int:
        """How many command nonces are remembered."""
        return len(self._nonces)

    def _forget_one(self) -> None:
        expires_at, nonce = heapq.heappop(self._expiries)
        del self._nonces[nonce]
        self.nonce_floor = max(self.nonce_floor, expires_at)

    def _forget_expired(self, now: int) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            self._forget_one()
