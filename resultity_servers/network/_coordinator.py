"""The Network coordinator: a sans-IO object over a Store; the caller passes ``now`` in.

Accounts and keys
    An account is created with an API key (returned in plaintext once, stored as its SHA-256)
    and optionally an Ed25519 public key. That *account key* is how the Network knows who
    signs grants: a ``NodeGrant`` is accepted only when it verifies against the public key
    registered for its ``account_id`` (the account holder keeps the secret key; the Network
    never sees it). An account without a key can spend credits but cannot admit nodes.

Node admission
    ``begin_registration`` checks the grant and the node key it names and returns a random
    challenge; ``complete_registration`` checks the node key's Ed25519 signature over
    ``bytes.fromhex(nonce)`` and issues a session token (random, stored as its SHA-256,
    expiring after ``session_ttl_s``) that authenticates the node's later requests. A node
    whose heartbeats stop is marked dead and its session stops working: it must register again.

Time is a float of Unix seconds; signed formats get ``int(now)``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from typing import Any

import attrs

from resultity_core import (
    PLATFORM_ACCOUNT,
    Capabilities,
    Challenge,
    ChallengeResponse,
    Envelope,
    Heartbeat,
    InvalidAmountError,
    InvalidAPIKeyError,
    JobAction,
    JobState,
    NodeAction,
    NodeConfig,
    NodeGrant,
    NodeState,
    Price,
    PublicKey,
    RegisterRequest,
    ResultityError,
    UnknownAccountError,
    apply_node_action,
    as_envelope,
    check_node_config,
    check_payload_type,
    node_config_hash,
    verify_grant,
)

from ._errors import AdmissionError, NetworkError, NodeAuthError
from ._jobs import JobDesk
from ._money import ledger_credit, ledger_settle
from ._records import (
    AccountRecord,
    ApiKeyRecord,
    GrantRecord,
    JobRecord,
    NodeRecord,
    SnapshotRecord,
)
from ._settings import CoordinatorSettings
from ._store import Store, StoreTx

__all__ = [
    "AccountBalance",
    "Coordinator",
    "HeartbeatReply",
    "ModelInfo",
    "NodeSession",
    "hash_secret",
]

_IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_API_KEY_PREFIX = "rk-"
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
class ModelInfo:
    """A model approved by the current NodeConfig and how many ready nodes serve it."""

    name: str
    version: str
    price: Price
    ready_nodes: int


@attrs.frozen
class AccountBalance:
    """Spendable and reserved micro-credits of one account."""

    account_id: str
    balance: int
    reserved: int


@attrs.frozen
class _Pending:
    public: PublicKey
    nonce: str
    grant: NodeGrant
    envelope: dict[str, Any]
    capabilities: Capabilities
    expires: float


class Coordinator(JobDesk):
    """Accounts, nodes, config snapshots, jobs and receipts over one Store (not thread-safe)."""

    def __init__(self, store: Store, settings: CoordinatorSettings | None = None) -> None:
        super().__init__(store, settings or CoordinatorSettings())
        self._pending: dict[str, _Pending] = {}
        # session digest -> (node id, expiry) of live nodes, so a node request costs no query.
        self._sessions: dict[str, tuple[str, float]] = {}
        with store.transaction() as tx:
            snap = tx.current_snapshot()
        if snap is not None:
            self._config = (snap.config_hash, NodeConfig.from_payload(snap.envelope["signed"]))

    @property
    def store(self) -> Store:
        """The store this coordinator writes to."""
        return self._store

    # --- accounts -----------------------------------------------------------------------------

    def create_account(
        self,
        now: float,
        *,
        account_id: str | None = None,
        public_key: PublicKey | None = None,
        initial_credits: int = 0,
    ) -> tuple[AccountRecord, str]:
        """Create an account with one API key; returns the record and the plaintext key.

        The key is shown only here. Raises AccountExistsError, InvalidAmountError (bad id or
        amount).
        """
        account_id = account_id or "acct-" + secrets.token_hex(8)
        self._check_account_id(account_id)
        record = AccountRecord(account_id, now, public_key.hex if public_key else None)
        with self._store.transaction() as tx:
            tx.insert_account(record)
            key = self._new_api_key(tx, account_id, now)
            if initial_credits:
                ledger_credit(tx, account_id, initial_credits, now)
        return record, key

    @staticmethod
    def _check_account_id(account_id: str) -> None:
        if not isinstance(account_id, str) or not _IDENT.fullmatch(account_id):
            raise InvalidAmountError("account_id", "must be 1-128 of [A-Za-z0-9._:-]")
        if account_id == PLATFORM_ACCOUNT:
            raise InvalidAmountError("account_id", f"{PLATFORM_ACCOUNT!r} is reserved")

    @staticmethod
    def _new_api_key(tx: StoreTx, account_id: str, now: float) -> str:
        key = _API_KEY_PREFIX + secrets.token_urlsafe(32)
        tx.insert_api_key(ApiKeyRecord(hash_secret(key), account_id, now, key[:8]))
        return key

    def create_api_key(self, account_id: str, now: float) -> str:
        """Add an API key to an account; returns the plaintext. Raises UnknownAccountError."""
        with self._store.transaction() as tx:
            if tx.get_account(account_id) is None or account_id == PLATFORM_ACCOUNT:
                raise UnknownAccountError(account_id)
            return self._new_api_key(tx, account_id, now)

    def set_account_key(self, account_id: str, public_key: PublicKey | None) -> AccountRecord:
        """Register (or clear) the account's grant-signing key; raises UnknownAccountError."""
        with self._store.transaction() as tx:
            record = tx.get_account(account_id)
            if record is None or account_id == PLATFORM_ACCOUNT:
                raise UnknownAccountError(account_id)
            record = attrs.evolve(record, public_key=public_key.hex if public_key else None)
            tx.update_account(record)
        return record

    def credit_account(self, account_id: str, amount: int, now: float) -> AccountBalance:
        """Mint ``amount`` micro-credits into the account; returns its new balance.

        Raises UnknownAccountError, InvalidAmountError.
        """
        with self._store.transaction() as tx:
            ledger_credit(tx, account_id, amount, now)
        return self.account_balance(account_id)

    def account_balance(self, account_id: str) -> AccountBalance:
        """Return the account's balance and open reservations; raises UnknownAccountError."""
        with self._store.transaction() as tx:
            state = tx.ledger_state([account_id], [])
            if account_id not in state.balances:
                raise UnknownAccountError(account_id)
            held = tx.reserved_total(account_id)
        return AccountBalance(account_id, state.balance(account_id), held)

    def list_accounts(self) -> list[AccountBalance]:
        """Return every account's balance (the platform account included)."""
        with self._store.transaction() as tx:
            ids = [a.account_id for a in tx.list_accounts()]
        return [self.account_balance(i) for i in ids]

    def authenticate(self, api_key: str) -> str:
        """Return the account id owning ``api_key``; raises InvalidAPIKeyError."""
        if not isinstance(api_key, str) or not api_key.startswith(_API_KEY_PREFIX):
            raise InvalidAPIKeyError("Incorrect API key provided.")
        digest = hash_secret(api_key)
        with self._store.transaction() as tx:
            record = tx.get_api_key(digest)
        if record is None or not hmac.compare_digest(record.key_hash, digest):
            raise InvalidAPIKeyError("Incorrect API key provided.")
        return record.account_id

    # --- config snapshots ---------------------------------------------------------------------

    def publish_config(self, envelope: Envelope | Mapping[str, Any] | bytes, now: float) -> str:
        """Make a signed NodeConfig the current one; returns its ``node_config_hash``.

        With ``settings.trust_root`` the snapshot must pass the node rules (threshold of the
        config role, not expired, not future-dated); without it only its format is checked.
        Ready nodes go back to syncing until they report the new hash. Raises
        NetworkError for a lower version or a different snapshot of the same version, and the
        core's format and signature errors.
        """
        env = as_envelope(envelope)
        if self.settings.trust_root is not None:
            config, digest = check_node_config(env, self.settings.trust_root, int(now))
        else:
            check_payload_type(env, NodeConfig.TYPE)
            config, digest = NodeConfig.from_payload(env.signed), node_config_hash(env.signed)
        if self._config is not None:
            current_hash, current = self._config
            if digest == current_hash:
                return digest
            if config.version <= current.version:
                raise NetworkError(
                    f"snapshot v{config.version} does not supersede the current "
                    f"v{current.version}")
        with self._store.transaction() as tx:
            tx.put_snapshot(SnapshotRecord(digest, env.to_payload(), config.version, now))
            tx.set_current_snapshot(digest)
            for node in tx.list_nodes():
                if node.state == NodeState.READY and node.config_hash != digest:
                    tx.put_node(attrs.evolve(
                        node, state=apply_node_action(node.state, NodeAction.CONFIG_CHANGED)))
                    self._unassign_queued(tx, node.node_id)
        self._config = (digest, config)
        return digest

    def current_config(self) -> tuple[str, NodeConfig] | None:
        """Return ``(node_config_hash, config)`` of the current snapshot, or None."""
        return self._config

    def snapshot(self, config_hash: str) -> dict[str, Any] | None:
        """Return the signed envelope (JSON form) published under ``config_hash``, or None."""
        with self._store.transaction() as tx:
            record = tx.get_snapshot(config_hash)
        return None if record is None else record.envelope

    def list_models(self) -> list[ModelInfo]:
        """Return the current config's models with the number of ready nodes serving each."""
        if self._config is None:
            return []
        with self._store.transaction() as tx:
            ready = [n for n in tx.list_nodes() if n.state == NodeState.READY]
        return [
            ModelInfo(m.name, m.version, m.price,
                      sum(1 for n in ready if m.name in n.capabilities.models))
            for m in self._config[1].models
        ]

    # --- node admission -----------------------------------------------------------------------

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

    def _live_node(self, tx: StoreTx, node_id: str) -> NodeRecord:
        node = tx.get_node(node_id)
        if node is None or node.state == NodeState.DEAD:
            raise NodeAuthError(f"node {node_id[:12]} is not registered or is dead")
        return node

    def heartbeat(self, node_id: str, beat: Heartbeat, now: float) -> HeartbeatReply:
        """Record a heartbeat; returns the node's state, the current config hash and the jobs
        it must abort.

        A syncing node becomes ready when it reports the current config hash with status
        ``ready``; a ready node reporting another hash or status ``syncing`` syncs again.
        Status ``draining`` drains it (no new work); any other status resumes it. Raises
        NodeAuthError (dead node, or ``beat.node_id`` is not ``node_id``).
        """
        if beat.node_id != node_id:
            raise NodeAuthError("heartbeat node_id does not match the session")
        current = self._config[0] if self._config else None
        with self._store.transaction() as tx:
            node = self._live_node(tx, node_id)
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
            tx.put_node(attrs.evolve(
                node, state=state, last_heartbeat=now, config_hash=beat.config_hash,
                active_jobs=beat.active_jobs, free_slots=beat.free_slots,
            ))
            if state != NodeState.READY:
                self._unassign_queued(tx, node_id)
            self._dispatch(tx)
        cancel = tuple(sorted(self._pending_cancels.pop(node_id, set())))
        return HeartbeatReply(state, current, cancel)

    def list_nodes(self) -> list[NodeRecord]:
        """Return every node record."""
        with self._store.transaction() as tx:
            return tx.list_nodes()

    # --- time ---------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Apply the timeouts: dead nodes, jobs queued or running too long, late receipts."""
        self._expire_challenges(now)
        with self._store.transaction() as tx:
            for node in tx.list_nodes():
                seen = max(node.last_heartbeat, self._last_seen.get(node.node_id, 0.0))
                if node.state != NodeState.DEAD and seen + self.settings.heartbeat_timeout_s < now:
                    self._lose_node_jobs(tx, node, "the node stopped sending heartbeats", now)
                    tx.put_node(attrs.evolve(
                        node, state=apply_node_action(node.state, NodeAction.TIMEOUT),
                        session_hash=None,
                    ))
                    self._forget_sessions(node.node_id)
            for job in tx.list_jobs([JobState.QUEUED]):
                if job.created + self.settings.queue_timeout_s < now:
                    self._end(tx, job, JobAction.FAIL,
                              "no node could take the job in time; retry later", now)
            for job in tx.list_jobs([JobState.LEASED, JobState.STREAMING]):
                if job.deadline is not None and job.deadline < now:
                    self._end(tx, job, JobAction.FAIL, "the job ran past its deadline", now)
            for job in tx.list_jobs([JobState.DONE], unsettled=True):
                if (job.finished_at or 0.0) + self.settings.receipt_timeout_s < now:
                    self._settle_without_receipt(tx, job, now)
            self._dispatch(tx)
        retention = self.settings.event_retention_s
        for job_id in [j for j, s in self._streams.items()
                       if s.finished_at is not None and s.finished_at + retention < now]:
            del self._streams[job_id]

    def _settle_without_receipt(self, tx: StoreTx, job: JobRecord, now: float) -> None:
        job, _ = ledger_settle(
            tx, job, prompt_tokens=job.prompt_tokens, completion_tokens=job.completion_tokens,
            payee_account=self._payee(tx, job), payee_share_bps=self.settings.node_share_bps,
            now=now,
        )
        tx.update_job(job)

    def ledger_totals(self) -> tuple[int, int, int]:
        """Return ``(minted, sum of balances, sum of reservations)``; the first is the sum of
        the other two in a consistent store."""
        with self._store.transaction() as tx:
            return tx.ledger_totals()

