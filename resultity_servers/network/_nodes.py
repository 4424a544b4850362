"""Node admission, sessions and heartbeats.

``begin_registration`` checks the grant and the node key it names and returns a random
challenge; ``complete_registration`` checks the node key's Ed25519 signature over
``bytes.fromhex(nonce)`` and issues a session token (random, stored as its SHA-256,
expiring after ``session_ttl_s``) that authenticates the node's later requests. A node
whose heartbeats stop is marked dead and its session stops working: it must register again.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

import attrs

from resultity_core import (
    Capabilities,
    Challenge,
    ChallengeResponse,
    Envelope,
    Heartbeat,
    NodeAction,
    NodeGrant,
    NodeState,
    PublicKey,
    RegisterRequest,
    ResultityError,
    apply_node_action,
    verify_grant,
)

from ._errors import AdmissionError, NodeAuthError
from ._receipts import ReceiptDesk
from ._records import GrantRecord, NodeRecord
from ._settings import CoordinatorSettings
from ._store import Store, StoreTx

__all__ = ["HeartbeatReply", "NodeDesk", "NodeSession", "hash_secret"]

_SESSION_PREFIX = "rns-"


def hash_secret(secret: str) -> str:
    """Return the lowercase hex SHA-256 of a secret (API key or session token)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@attrs.frozen
class NodeSession:
    """A node's session: send ``token`` as ``Authorization: Bearer`` until ``expires_at``."""

    node_id: str
    token: str
    expires_at: float
    state: NodeState

    def to_payload(self) -> dict[str, Any]:
        """Return the JSON form sent to the node."""
        return {"_type": "node_session", "node_id": self.node_id, "token": self.token,
                "expires_at": int(self.expires_at), "state": str(self.state)}


@attrs.frozen
class HeartbeatReply:
    """The Network's answer to a heartbeat: the node's state, the current config, aborts."""

    state: NodeState
    config_hash: str | None
    cancel: tuple[str, ...]

    def to_payload(self) -> dict[str, Any]:
        """Return the JSON form sent to the node."""
        return {"_type": "heartbeat_reply", "state": str(self.state),
                "config_hash": self.config_hash, "cancel": list(self.cancel)}


@attrs.frozen
class _Pending:
    public: PublicKey
    nonce: str
    grant: NodeGrant
    envelope: dict[str, Any]
    capabilities: Capabilities
    expires: float


class NodeDesk(ReceiptDesk):
    """Admitting nodes (grant, challenge, session) and following their heartbeats."""

    def __init__(self, store: Store, settings: CoordinatorSettings) -> None:
        super().__init__(store, settings)
        self._pending: dict[str, _Pending] = {}
        # session digest -> (node id, expiry) of live nodes, so a node request costs no query.
        self._sessions: dict[str, tuple[str, float]] = {}

    def begin_registration(self, request: RegisterRequest, now: float) -> Challenge:
        """Check a node's grant and return a challenge for its key.

        The grant must be an envelope of a NodeGrant signed by its account's registered key,
        valid at ``now`` and naming ``request.node_public_key``. Raises AdmissionError.
        """
        try:
            env = Envelope.from_payload(dict(request.grant))
            account_id = env.signed.get("account_id")
            if not isinstance(account_id, str):
                raise AdmissionError("grant: account_id is missing")
            with self._store.transaction() as tx:
                account = tx.get_account(account_id)
            if account is None or account.public_key is None:
                raise AdmissionError(f"account {account_id!r} has no registered grant key")
            grant = verify_grant(env, PublicKey.from_hex(account.public_key), int(now))
        except AdmissionError:
            raise
        except ResultityError as exc:
            raise AdmissionError(f"grant refused: {exc}") from None
        if grant.node_public.hex != request.node_public_key:
            raise AdmissionError("the grant is for another node key")
        self._expire_challenges(now)
        if len(self._pending) >= self.settings.max_pending_challenges:
            self._pending.pop(next(iter(self._pending)))
        nonce = secrets.token_hex(32)
        self._pending[grant.node_keyid] = _Pending(
            grant.node_public, nonce, grant, env.to_payload(), request.capabilities,
            now + self.settings.challenge_ttl_s,
        )
        return Challenge(nonce)

    def _expire_challenges(self, now: float) -> None:
        for node_id in [k for k, p in self._pending.items() if p.expires <= now]:
            del self._pending[node_id]

    def complete_registration(self, response: ChallengeResponse, now: float) -> NodeSession:
        """Check the challenge signature and admit the node; returns its new session.

        A node that was still live (an Agent that restarted) is first treated as lost: its
        jobs without output are requeued, those mid-stream fail. Raises AdmissionError.
        """
        pending = self._pending.pop(response.node_id, None)
        if pending is None or pending.expires <= now:
            raise AdmissionError("no pending challenge for this node (register first)")
        try:
            pending.public.verify(bytes.fromhex(pending.nonce), bytes.fromhex(response.signature))
        except (ResultityError, ValueError):
            raise AdmissionError("the challenge signature does not verify") from None
        token = _SESSION_PREFIX + secrets.token_urlsafe(32)
        node_id = response.node_id
        self._forget_sessions(node_id)
        with self._store.transaction() as tx:
            old = tx.get_node(node_id)
            state = NodeState.REGISTERING
            if old is not None:
                state = old.state
                if state != NodeState.DEAD:
                    self._lose_node_jobs(tx, old, "the node registered again", now)
                    state = apply_node_action(state, NodeAction.SHUTDOWN)
                state = apply_node_action(state, NodeAction.REGISTER)
            state = apply_node_action(state, NodeAction.ADMITTED)
            tx.put_grant(GrantRecord(node_id, pending.grant.account_id, pending.envelope,
                                     pending.grant.issued_at, pending.grant.expires_at))
            tx.put_node(NodeRecord(
                node_id=node_id, public_key=pending.public.hex,
                account_id=pending.grant.account_id, state=state, registered_at=now,
                last_heartbeat=now, capabilities=pending.capabilities,
                session_hash=hash_secret(token),
                session_expires=now + self.settings.session_ttl_s,
            ))
            self._dispatch(tx)
        return NodeSession(node_id, token, now + self.settings.session_ttl_s, state)

    def authenticate_node(self, token: str, now: float) -> str:
        """Return the node id whose live session ``token`` is; raises NodeAuthError."""
        if not isinstance(token, str) or not token.startswith(_SESSION_PREFIX):
            raise NodeAuthError("missing or malformed node session token")
        digest = hash_secret(token)
        cached = self._sessions.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        with self._store.transaction() as tx:
            node = tx.node_by_session(digest)
        if node is None or node.session_hash is None or not hmac.compare_digest(
            node.session_hash, digest
        ):
            raise NodeAuthError("unknown node session (register again)")
        if node.session_expires <= now:
            raise NodeAuthError("node session expired (register again)")
        if node.state == NodeState.DEAD:
            raise NodeAuthError("node was marked dead (register again)")
        self._sessions[digest] = (node.node_id, node.session_expires)
        return node.node_id

    def _forget_sessions(self, node_id: str) -> None:
        for digest in [d for d, (n, _) in self._sessions.items() if n == node_id]:
            del self._sessions[digest]

    def heartbeat(self, node_id: str, beat: Heartbeat, now: float) -> HeartbeatReply:
        """Record a heartbeat; returns the node's state, the current config hash and the jobs
        it must abort.

        A syncing node becomes ready when it reports the current config hash with status
        ``ready``; a ready node reporting another hash or status ``syncing`` syncs again.
        Status ``draining`` drains it (no new work); any other status resumes it. A node whose
        grant has expired is shut down (its jobs requeued or failed) and must register again
        with a new grant. Raises NodeAuthError (dead node, expired grant, or ``beat.node_id``
        is not ``node_id``).
        """
        if beat.node_id != node_id:
            raise NodeAuthError("heartbeat node_id does not match the session")
        current = self._config[0] if self._config else None
        with self._store.transaction() as tx:
            node = self._live_node(tx, node_id)
            grant = tx.get_grant(node_id)
            expired = grant is None or grant.expires_at <= now
            if expired:
                self._lose_node_jobs(tx, node, "the node's grant expired", now)
                tx.put_node(attrs.evolve(
                    node, state=apply_node_action(node.state, NodeAction.SHUTDOWN),
                    session_hash=None,
                ))
                self._forget_sessions(node_id)
            else:
                state = self._record_heartbeat(tx, node, beat, current, now)
        if expired:  # raised after the block, so the shutdown above is committed
            raise NodeAuthError("the node's grant has expired (register with a new grant)")
        cancel = tuple(sorted(self._pending_cancels.pop(node_id, set())))
        return HeartbeatReply(state, current, cancel)

    def _record_heartbeat(
        self, tx: StoreTx, node: NodeRecord, beat: Heartbeat, current: str | None, now: float
    ) -> NodeState:
        state = apply_node_action(node.state, NodeAction.HEARTBEAT)
        if beat.status == "draining" and state != NodeState.DRAINING:
            state = apply_node_action(state, NodeAction.DRAIN)
        elif beat.status != "draining" and state == NodeState.DRAINING:
            state = apply_node_action(state, NodeAction.RESUME)
        synced = current is not None and beat.config_hash == current
        if state == NodeState.SYNCING and synced and beat.status == "ready":
            state = apply_node_action(state, NodeAction.CONFIG_APPLIED)
        elif state == NodeState.READY and (not synced or beat.status == "syncing"):
            state = apply_node_action(state, NodeAction.CONFIG_CHANGED)
        self._last_seen[node.node_id] = now
        record = attrs.evolve(node, state=state, config_hash=beat.config_hash,
                              active_jobs=beat.active_jobs, free_slots=beat.free_slots)
        # The time of the beat is kept in memory (``_last_seen``, which the tick reads too)
        # and written with any other change, else every third of the heartbeat timeout (what
        # a restarted Network goes by): a steady beat costs no disk write.
        if record != node or now - node.last_heartbeat >= self.settings.heartbeat_timeout_s / 3:
            tx.put_node(attrs.evolve(record, last_heartbeat=now))
        moved = state != NodeState.READY and self._unassign_queued(tx, node.node_id)
        # Routing reads node states and queued jobs: a beat that changes neither (the steady
        # state) has nothing to route, and skips reading every node; the tick routes the rest.
        if moved or state != node.state:
            self._dispatch(tx)
        return state

    def list_nodes(self) -> list[NodeRecord]:
        """Return every node record."""
        with self._store.transaction() as tx:
            return tx.list_nodes()
