"""The Network coordinator: a sans-IO object over a Store; the caller passes ``now`` in.

Accounts and keys
    An account is created with an API key (returned in plaintext once, stored as its SHA-256)
    and optionally an Ed25519 public key. That *account key* is how the Network knows who
    signs grants: a ``NodeGrant`` is accepted only when it verifies against the public key
    registered for its ``account_id`` (the account holder keeps the secret key; the Network
    never sees it). An account without a key can spend credits but cannot admit nodes.

Node admission, jobs and receipts live in ``_nodes``, ``_jobs`` and ``_receipts``; this


class adds accounts, config snapshots and the clock-driven timeouts.

Time is a float of Unix seconds; signed formats get ``int(now)``.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Mapping
from typing import Any

import attrs

from resultity_core import (
    PLATFORM_ACCOUNT,
    Envelope,
    InvalidAmountError,
    InvalidAPIKeyError,
    JobAction,
    JobState,
    NodeAction,
    NodeConfig,
    NodeState,
    Price,
    PublicKey,
    UnknownAccountError,
    apply_node_action,
    as_envelope,
    check_node_config,
    check_payload_type,
    node_config_hash,
)

from ._errors import NetworkError
from ._money import ledger_credit, ledger_settle
from ._nodes import NodeDesk, hash_secret
from ._records import (
    AccountRecord,
    ApiKeyRecord,
    JobRecord,
    LedgerEntry,
    SnapshotRecord,
)
from ._settings import CoordinatorSettings
from ._store import Store, StoreTx

__all__ = ["AccountBalance", "Coordinator", "ModelInfo"]

_IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_API_KEY_PREFIX = "rk-"


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


class Coordinator(NodeDesk):
    """Accounts, nodes, config snapshots, jobs and receipts over one Store.

    Not thread-safe: drive it from one event loop. One Coordinator per store: it keeps the
    current config, node sessions and job output in memory, so another process must not
    publish configs or run jobs on the same database (operators use the HTTP routes; writing
    accounts, API keys and credits directly through a store transaction is safe).
    """

    def __init__(self, store: Store, settings: CoordinatorSettings | None = None) -> None:
        super().__init__(store, settings or CoordinatorSettings())
        with store.transaction() as tx:
            snap = tx.current_snapshot()
        if snap is not None:
            self._config = (snap.config_hash, NodeConfig.from_payload(snap.envelope["signed"]))

    @property
    def store(self) -> Store:
        """The store this coordinator writes to."""
        return self._store

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

    def ledger_entries(self, account_id: str) -> list[LedgerEntry]:
        """Return the account's journal, oldest first; raises UnknownAccountError."""
        with self._store.transaction() as tx:
            if tx.get_account(account_id) is None:
                raise UnknownAccountError(account_id)
            return tx.entries(account_id)

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
            # The store picks the expired jobs: a tick must not read (and decode the requests
            # of) every job in flight twice a second.
            settings = self.settings
            for job in tx.list_jobs([JobState.QUEUED],
                                    created_before=now - settings.queue_timeout_s):
                self._end(tx, job, JobAction.FAIL,
                          "no node could take the job in time; retry later",
                          code="no_capacity", now=now)
            for job in tx.list_jobs([JobState.LEASED, JobState.STREAMING], deadline_before=now):
                self._end(tx, job, JobAction.FAIL, "the job ran past its deadline",
                          code="timeout", now=now)
            for job in tx.list_jobs([JobState.DONE], unsettled=True,
                                    finished_before=now - settings.receipt_timeout_s):
                self._settle_without_receipt(tx, job, now)
            self._dispatch(tx)
        retention = self.settings.event_retention_s
        delivered = self.settings.delivered_retention_s
        for job_id in [j for j, s in self._streams.items() if s.finished_at is not None and (
                s.finished_at + retention < now
                or (s.delivered_at is not None and s.delivered_at + delivered < now))]:
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
