"""The Network's store interface: one transaction object over every table.

``Store.transaction()`` yields a ``StoreTx``; everything done through it commits together when
the block ends normally and is rolled back when it raises, so a job's state change, its
receipt and its ledger movements are never half applied. Two implementations sit beside this
file: ``MemoryStore`` (tests, throwaway demos) and ``SQLiteStore`` (WAL, durable).

The ledger is kept as balances and open reservations; the pure functions of
``resultity_core`` do the arithmetic. ``ledger_state`` loads just the accounts and
reservations an operation touches (a partial ``LedgerState`` whose ``minted`` is their sum)
and ``ledger_update`` writes back what changed and adds any newly minted credits to the
store-wide total, so ``sum(balances) + sum(reservations) == minted`` holds for the whole store.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Iterable
from contextlib import AbstractContextManager

from resultity_core import JobState, LedgerState

from ._records import (
    AccountRecord,
    ApiKeyRecord,
    GrantRecord,
    JobRecord,
    LedgerEntry,
    NodeRecord,
    ReceiptRecord,
    SnapshotRecord,
)

__all__ = ["ACTIVE_JOB_STATES", "Store", "StoreTx"]

ACTIVE_JOB_STATES = (JobState.QUEUED, JobState.LEASED, JobState.STREAMING)


class StoreTx(abc.ABC):
    """The operations available inside one transaction."""

    # --- accounts and API keys ------------------------------------------------------------

    @abc.abstractmethod
    def insert_account(self, record: AccountRecord) -> None:
        """Add an account with a zero balance; raises AccountExistsError if the id is taken."""

    @abc.abstractmethod
    def update_account(self, record: AccountRecord) -> None:
        """Replace an existing account's record (its balance is untouched)."""

    @abc.abstractmethod
    def get_account(self, account_id: str) -> AccountRecord | None:
        """Return the account, or None."""

    @abc.abstractmethod
    def list_accounts(self) -> list[AccountRecord]:
        """Return every account, ordered by id."""

    @abc.abstractmethod
    def insert_api_key(self, record: ApiKeyRecord) -> None:
        """Add an API key record (by hash)."""

    @abc.abstractmethod
    def get_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        """Return the API key record whose hash is ``key_hash``, or None."""

    # --- nodes, grants, snapshots ---------------------------------------------------------

    @abc.abstractmethod
    def put_node(self, record: NodeRecord) -> None:
        """Insert or replace a node."""

    @abc.abstractmethod
    def get_node(self, node_id: str) -> NodeRecord | None:
        """Return the node, or None."""

    @abc.abstractmethod
    def node_by_session(self, session_hash: str) -> NodeRecord | None:
        """Return the node whose session token hashes to ``session_hash``, or None."""

    @abc.abstractmethod
    def list_nodes(self) -> list[NodeRecord]:
        """Return every node, ordered by id."""

    @abc.abstractmethod
    def put_grant(self, record: GrantRecord) -> None:
        """Insert or replace the grant of a node."""

    @abc.abstractmethod
    def get_grant(self, node_id: str) -> GrantRecord | None:
        """Return the grant that admitted the node, or None."""

    @abc.abstractmethod
    def put_snapshot(self, record: SnapshotRecord) -> None:
        """Store a snapshot by hash (storing the same hash again is a no-op)."""

    @abc.abstractmethod
    def get_snapshot(self, config_hash: str) -> SnapshotRecord | None:
        """Return the snapshot with this hash, or None."""

    @abc.abstractmethod
    def set_current_snapshot(self, config_hash: str) -> None:
        """Point "current" at a stored snapshot."""

    @abc.abstractmethod
    def current_snapshot(self) -> SnapshotRecord | None:
        """Return the current snapshot, or None when none was published."""

    # --- jobs and receipts ----------------------------------------------------------------

    @abc.abstractmethod
    def insert_job(self, record: JobRecord) -> None:
        """Add a job; raises JobStateError if the id is taken."""

    @abc.abstractmethod
    def update_job(self, record: JobRecord) -> None:
        """Replace an existing job."""

    @abc.abstractmethod
    def get_job(self, job_id: str) -> JobRecord | None:
        """Return the job, or None."""

    @abc.abstractmethod
    def list_jobs(
        self,
        states: Collection[JobState],
        *,
        node_id: str | None = None,
        unassigned: bool = False,
        unsettled: bool = False,
        created_before: float | None = None,
        deadline_before: float | None = None,
        finished_before: float | None = None,
        limit: int | None = None,
    ) -> list[JobRecord]:
        """Return jobs in ``states``, oldest first; optionally only one node's, only those
        with no node, only those not yet settled, only those created before, with a deadline
        before, or finished (a missing ``finished_at`` counting as 0) before a time, at most
        ``limit``."""

    @abc.abstractmethod
    def active_job_counts(self) -> dict[str, int]:
        """Return, per node id, how many queued/leased/streaming jobs are assigned to it."""

    @abc.abstractmethod
    def insert_receipt(self, record: ReceiptRecord) -> None:
        """Add a receipt; raises ReceiptConflictError if the job already has one."""

    @abc.abstractmethod
    def get_receipt(self, job_id: str) -> ReceiptRecord | None:
        """Return the receipt of a job, or None."""

    # --- ledger ---------------------------------------------------------------------------

    @abc.abstractmethod
    def ledger_state(self, accounts: Iterable[str], reservations: Iterable[str]) -> LedgerState:
        """Return the partial ledger of these accounts and open reservations.

        Unknown accounts and reservations are left out (the core functions then raise
        UnknownAccountError / UnknownReservationError); each reservation's account is included.
        """

    @abc.abstractmethod
    def ledger_update(self, before: LedgerState, after: LedgerState) -> None:
        """Write the balances and reservations that differ from ``before`` to ``after``."""

    @abc.abstractmethod
    def reserved_total(self, account_id: str) -> int:
        """Return the sum of the account's open reservations."""

    @abc.abstractmethod
    def ledger_totals(self) -> tuple[int, int, int]:
        """Return ``(minted, sum of balances, sum of open reservations)`` over the store."""

    @abc.abstractmethod
    def add_entry(self, entry: LedgerEntry) -> None:
        """Append a journal entry (its ``seq`` is assigned by the store)."""

    @abc.abstractmethod
    def entries(self, account_id: str | None = None) -> list[LedgerEntry]:
        """Return journal entries (of one account, or all), oldest first."""


class Store(abc.ABC):
    """A place the Network's state lives; see the module docstring."""

    @abc.abstractmethod
    def transaction(self) -> AbstractContextManager[StoreTx]:
        """Return a context manager yielding a StoreTx; commits on success, rolls back on error."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release resources; the store must not be used afterwards."""
