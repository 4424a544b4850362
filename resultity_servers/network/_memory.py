"""``MemoryStore``: the store in dictionaries, with rollback by an undo log (for tests)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs

from resultity_core import (
    PLATFORM_ACCOUNT,
    AccountExistsError,
    JobState,
    LedgerState,
    Reservation,
    UnknownAccountError,
)

from ._errors import JobStateError, ReceiptConflictError
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
from ._store import ACTIVE_JOB_STATES, Store, StoreTx

__all__ = ["MemoryStore"]

_MISSING: Any = object()


class MemoryStore(Store, StoreTx):
    """Every table a dict; a transaction records undo steps and replays them on error.

    Not durable and not shared between processes; one transaction at a time (the Network runs
    in one event loop thread).
    """

    def __init__(self) -> None:
        self._t: dict[str, dict[Any, Any]] = {
            name: {}
            for name in (
                "accounts", "balances", "api_keys", "nodes", "sessions", "grants",
                "snapshots", "jobs", "receipts", "reservations", "meta",
            )
        }
        self._entries: list[LedgerEntry] = []
        self._undo: list[tuple[dict[Any, Any], Any, Any]] | None = None
        self._t["meta"]["minted"] = 0
        self._t["accounts"][PLATFORM_ACCOUNT] = AccountRecord(PLATFORM_ACCOUNT, 0.0)
        self._t["balances"][PLATFORM_ACCOUNT] = 0

    @contextmanager
    def transaction(self) -> Iterator[StoreTx]:
        if self._undo is not None:
            raise RuntimeError("MemoryStore transactions do not nest")
        self._undo = []
        entries = len(self._entries)
        try:
            yield self
        except BaseException:
            for table, key, old in reversed(self._undo):
                if old is _MISSING:
                    table.pop(key, None)
                else:
                    table[key] = old
            del self._entries[entries:]
            raise
        finally:
            self._undo = None

    def close(self) -> None:
        pass

    def _set(self, table: str, key: Any, value: Any) -> None:
        t = self._t[table]
        assert self._undo is not None, "writes happen inside a transaction"
        self._undo.append((t, key, t.get(key, _MISSING)))
        if value is _MISSING:
            t.pop(key, None)
        else:
            t[key] = value

    # --- accounts and API keys ----------------------------------------------------------------

    def insert_account(self, record: AccountRecord) -> None:
        if record.account_id in self._t["accounts"]:
            raise AccountExistsError(f"account {record.account_id!r} already exists")
        self._set("accounts", record.account_id, record)
        self._set("balances", record.account_id, 0)

    def update_account(self, record: AccountRecord) -> None:
        if record.account_id not in self._t["accounts"]:
            raise UnknownAccountError(record.account_id)
        self._set("accounts", record.account_id, record)

    def get_account(self, account_id: str) -> AccountRecord | None:
        return self._t["accounts"].get(account_id)

    def list_accounts(self) -> list[AccountRecord]:
        return [self._t["accounts"][k] for k in sorted(self._t["accounts"])]

    def insert_api_key(self, record: ApiKeyRecord) -> None:
        self._set("api_keys", record.key_hash, record)

    def get_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        return self._t["api_keys"].get(key_hash)

    # --- nodes, grants, snapshots -------------------------------------------------------------

    def put_node(self, record: NodeRecord) -> None:
        old = self._t["nodes"].get(record.node_id)
        if old is not None and old.session_hash is not None:
            self._set("sessions", old.session_hash, _MISSING)
        self._set("nodes", record.node_id, record)
        if record.session_hash is not None:
            self._set("sessions", record.session_hash, record.node_id)

    def get_node(self, node_id: str) -> NodeRecord | None:
        return self._t["nodes"].get(node_id)

    def node_by_session(self, session_hash: str) -> NodeRecord | None:
        node_id = self._t["sessions"].get(session_hash)
        return None if node_id is None else self._t["nodes"].get(node_id)

    def list_nodes(self) -> list[NodeRecord]:
        return [self._t["nodes"][k] for k in sorted(self._t["nodes"])]

    def put_grant(self, record: GrantRecord) -> None:
        self._set("grants", record.node_id, record)

    def get_grant(self, node_id: str) -> GrantRecord | None:
        return self._t["grants"].get(node_id)

    def put_snapshot(self, record: SnapshotRecord) -> None:
        if record.config_hash not in self._t["snapshots"]:
            self._set("snapshots", record.config_hash, record)

    def get_snapshot(self, config_hash: str) -> SnapshotRecord | None:
        return self._t["snapshots"].get(config_hash)

    def set_current_snapshot(self, config_hash: str) -> None:
        if config_hash not in self._t["snapshots"]:
            raise KeyError(config_hash)
        self._set("meta", "current", config_hash)

    def current_snapshot(self) -> SnapshotRecord | None:
        current = self._t["meta"].get("current")
        return None if current is None else self._t["snapshots"][current]

    # --- jobs and receipts --------------------------------------------------------------------

    def insert_job(self, record: JobRecord) -> None:
        if record.job_id in self._t["jobs"]:
            raise JobStateError(f"job {record.job_id!r} already exists")
        self._set("jobs", record.job_id, record)

    def update_job(self, record: JobRecord) -> None:
        if record.job_id not in self._t["jobs"]:
            raise KeyError(record.job_id)
        self._set("jobs", record.job_id, record)

    def get_job(self, job_id: str) -> JobRecord | None:
        return self._t["jobs"].get(job_id)

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
        wanted = set(states)
        out = [
            job
            for job in self._t["jobs"].values()
            if job.state in wanted
            and (node_id is None or job.node_id == node_id)
            and (not unassigned or job.node_id is None)
            and (not unsettled or not job.settled)
            and (created_before is None or job.created < created_before)
            and (deadline_before is None
                 or (job.deadline is not None and job.deadline < deadline_before))
            and (finished_before is None or (job.finished_at or 0.0) < finished_before)
        ]
        out.sort(key=lambda job: (job.created, job.job_id))
        return out if limit is None else out[:limit]

    def active_job_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job in self.list_jobs(ACTIVE_JOB_STATES):
            if job.node_id is not None:
                counts[job.node_id] = counts.get(job.node_id, 0) + 1
        return counts

    def insert_receipt(self, record: ReceiptRecord) -> None:
        if record.job_id in self._t["receipts"]:
            raise ReceiptConflictError(f"job {record.job_id!r} already has a receipt")
        self._set("receipts", record.job_id, record)

    def get_receipt(self, job_id: str) -> ReceiptRecord | None:
        return self._t["receipts"].get(job_id)

    # --- ledger -------------------------------------------------------------------------------

    def ledger_state(self, accounts: Iterable[str], reservations: Iterable[str]) -> LedgerState:
        held = self._t["reservations"]
        res = {rid: held[rid] for rid in set(reservations) if rid in held}
        names = set(accounts) | {r.account for r in res.values()}
        balances = {a: self._t["balances"][a] for a in names if a in self._t["balances"]}
        minted = sum(balances.values()) + sum(r.amount for r in res.values())
        return LedgerState(balances=balances, reservations=res, minted=minted)

    def ledger_update(self, before: LedgerState, after: LedgerState) -> None:
        for account, amount in after.balances.items():
            if before.balances.get(account) != amount:
                if account not in self._t["balances"]:
                    raise UnknownAccountError(account)
                self._set("balances", account, amount)
        for rid in before.reservations:
            if rid not in after.reservations:
                self._set("reservations", rid, _MISSING)
        for rid, reservation in after.reservations.items():
            if before.reservations.get(rid) != reservation:
                self._set("reservations", rid, Reservation(rid, reservation.account,
                                                           reservation.amount))
        if after.minted != before.minted:
            self._set("meta", "minted", self._t["meta"]["minted"] + after.minted - before.minted)

    def reserved_total(self, account_id: str) -> int:
        return sum(r.amount for r in self._t["reservations"].values() if r.account == account_id)

    def ledger_totals(self) -> tuple[int, int, int]:
        return (
            self._t["meta"]["minted"],
            sum(self._t["balances"].values()),
            sum(r.amount for r in self._t["reservations"].values()),
        )

    def add_entry(self, entry: LedgerEntry) -> None:
        assert self._undo is not None, "writes happen inside a transaction"
        self._entries.append(attrs.evolve(entry, seq=len(self._entries) + 1))

    def entries(self, account_id: str | None = None) -> list[LedgerEntry]:
        return [e for e in self._entries if account_id is None or e.account_id == account_id]
