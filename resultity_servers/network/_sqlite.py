"""``SQLiteStore``: the store in one SQLite file (stdlib sqlite3, WAL, versioned schema).

Durability: WAL journal, ``synchronous=NORMAL`` by default (a committed transaction survives a
crash of the process; ``FULL`` also survives power loss at the price of an fsync per commit).
Every ``transaction()`` is ``BEGIN IMMEDIATE`` ... ``COMMIT``, so the job, receipt and ledger
rows of one coordinator step land together or not at all. The schema version lives in
``PRAGMA user_version``; ``MIGRATIONS[i]`` takes version ``i`` to ``i + 1``.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from resultity_core import (
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
from ._sqlite_schema import (
    JOB_COLUMNS,
    MIGRATIONS,
    NODE_COLUMNS,
    SCHEMA_VERSION,
    dumps,
    job_from_row,
    node_from_row,
)
from ._store import ACTIVE_JOB_STATES, Store, StoreTx

__all__ = ["SQLiteStore"]

class SQLiteStore(Store, StoreTx):
    """The store in ``path`` (created with its directory if missing; migrated on open).

    Raises sqlite3.DatabaseError if the file is not a database, and RuntimeError if its schema
    is newer than this code knows.
    """

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "NORMAL") -> None:
        if synchronous.upper() not in {"NORMAL", "FULL", "EXTRA"}:
            raise ValueError("synchronous must be NORMAL, FULL or EXTRA")
        directory = os.path.dirname(os.fspath(path))
        if directory:
            os.makedirs(directory, exist_ok=True)
        self.path = os.fspath(path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._in_tx = False
        try:
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path}: schema version {version} is newer than this code ({SCHEMA_VERSION})"
            )
        for index in range(version, SCHEMA_VERSION):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[index].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={index + 1}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        """Return the ``user_version`` of the open database."""
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def transaction(self) -> Iterator[StoreTx]:
        if self._in_tx:
            raise RuntimeError("SQLiteStore transactions do not nest")
        # IMMEDIATE: the write lock is taken up front, so another process writing the same
        # file (an operator's CLI) waits on busy_timeout instead of failing mid-transaction.
        self._db.execute("BEGIN IMMEDIATE")
        self._in_tx = True
        try:
            yield self
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")
        finally:
            self._in_tx = False

    def close(self) -> None:
        self._db.close()

    def _one(self, sql: str, *args: Any) -> Any:
        return self._db.execute(sql, args).fetchone()

    # --- accounts and API keys ----------------------------------------------------------------

    def insert_account(self, record: AccountRecord) -> None:
        try:
            self._db.execute(
                "INSERT INTO accounts (account_id, created, public_key) VALUES (?, ?, ?)",
                (record.account_id, record.created, record.public_key),
            )
        except sqlite3.IntegrityError:
            raise AccountExistsError(f"account {record.account_id!r} already exists") from None

    def update_account(self, record: AccountRecord) -> None:
        cur = self._db.execute(
            "UPDATE accounts SET created = ?, public_key = ? WHERE account_id = ?",
            (record.created, record.public_key, record.account_id),
        )
        if cur.rowcount != 1:
            raise UnknownAccountError(record.account_id)

    def get_account(self, account_id: str) -> AccountRecord | None:
        row = self._one(
            "SELECT account_id, created, public_key FROM accounts WHERE account_id = ?",
            account_id,
        )
        return None if row is None else AccountRecord(*row)

    def list_accounts(self) -> list[AccountRecord]:
        rows = self._db.execute(
            "SELECT account_id, created, public_key FROM accounts ORDER BY account_id"
        )
        return [AccountRecord(*row) for row in rows]

    def insert_api_key(self, record: ApiKeyRecord) -> None:
        self._db.execute(
            "INSERT INTO api_keys VALUES (?, ?, ?, ?)",
            (record.key_hash, record.account_id, record.created, record.prefix),
        )

    def get_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        row = self._one(
            "SELECT key_hash, account_id, created, prefix FROM api_keys WHERE key_hash = ?",
            key_hash,
        )
        return None if row is None else ApiKeyRecord(*row)

    # --- nodes, grants, snapshots -------------------------------------------------------------

    def put_node(self, record: NodeRecord) -> None:
        self._db.execute(
            f"INSERT OR REPLACE INTO nodes ({NODE_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.node_id, record.public_key, record.account_id, str(record.state),
                record.registered_at, record.last_heartbeat,
                dumps(record.capabilities.to_payload()), record.config_hash,
                record.active_jobs, record.free_slots, record.session_hash,
                record.session_expires,
            ),
        )

    def get_node(self, node_id: str) -> NodeRecord | None:
        row = self._one(f"SELECT {NODE_COLUMNS} FROM nodes WHERE node_id = ?", node_id)
        return None if row is None else node_from_row(row)

    def node_by_session(self, session_hash: str) -> NodeRecord | None:
        row = self._one(f"SELECT {NODE_COLUMNS} FROM nodes WHERE session_hash = ?", session_hash)
        return None if row is None else node_from_row(row)

    def list_nodes(self) -> list[NodeRecord]:
        return [node_from_row(r) for r in self._db.execute(f"SELECT {NODE_COLUMNS} FROM nodes "
                                                   "ORDER BY node_id")]

    def put_grant(self, record: GrantRecord) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO grants VALUES (?, ?, ?, ?, ?)",
            (record.node_id, record.account_id, dumps(record.envelope), record.issued_at,
             record.expires_at),
        )

    def get_grant(self, node_id: str) -> GrantRecord | None:
        row = self._one("SELECT node_id, account_id, envelope, issued_at, expires_at "
                        "FROM grants WHERE node_id = ?", node_id)
        if row is None:
            return None
        return GrantRecord(row[0], row[1], json.loads(row[2]), row[3], row[4])

    def put_snapshot(self, record: SnapshotRecord) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO snapshots VALUES (?, ?, ?, ?)",
            (record.config_hash, dumps(record.envelope), record.version, record.published_at),
        )

    def get_snapshot(self, config_hash: str) -> SnapshotRecord | None:
        row = self._one("SELECT config_hash, envelope, version, published_at FROM snapshots "
                        "WHERE config_hash = ?", config_hash)
        return None if row is None else SnapshotRecord(row[0], json.loads(row[1]), row[2], row[3])

    def set_current_snapshot(self, config_hash: str) -> None:
        if self.get_snapshot(config_hash) is None:
            raise KeyError(config_hash)
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('current', ?)", (config_hash,))

    def current_snapshot(self) -> SnapshotRecord | None:
        row = self._one("SELECT value FROM meta WHERE key = 'current'")
        return None if row is None else self.get_snapshot(row[0])

    # --- jobs and receipts --------------------------------------------------------------------

    def _job_values(self, r: JobRecord) -> tuple[Any, ...]:
        return (
            r.job_id, r.account_id, r.model, dumps(r.request), str(r.state), r.created,
            r.max_tokens, r.prompt_tokens_estimate, r.price.prompt_per_1k,
            r.price.completion_per_1k, r.reserved, r.choices, r.node_id, r.attempts,
            r.first_token_at, r.finished_at, r.deadline, r.prompt_tokens, r.completion_tokens,
            r.charge, int(r.settled), r.error,
        )

    def insert_job(self, record: JobRecord) -> None:
        try:
            self._db.execute(
                f"INSERT INTO jobs ({JOB_COLUMNS}) VALUES ({', '.join('?' * 22)})",
                self._job_values(record),
            )
        except sqlite3.IntegrityError:
            raise JobStateError(f"job {record.job_id!r} already exists") from None

    def update_job(self, record: JobRecord) -> None:
        names = [c.strip() for c in JOB_COLUMNS.split(",")][1:]
        values = self._job_values(record)
        cur = self._db.execute(
            f"UPDATE jobs SET {', '.join(n + ' = ?' for n in names)} WHERE job_id = ?",
            (*values[1:], values[0]),
        )
        if cur.rowcount != 1:
            raise KeyError(record.job_id)

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._one(f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?", job_id)
        return None if row is None else job_from_row(row)

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
        wanted = [str(s) for s in states]
        sql = f"SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ({', '.join('?' * len(wanted))})"
        args: list[Any] = list(wanted)
        if node_id is not None:
            sql += " AND node_id = ?"
            args.append(node_id)
        if unassigned:
            sql += " AND node_id IS NULL"
        if unsettled:
            sql += " AND settled = 0"
        for clause, value in (("created < ?", created_before),
                              ("deadline < ?", deadline_before),  # NULL: no deadline, left out
                              ("COALESCE(finished_at, 0) < ?", finished_before)):
            if value is not None:
                sql += " AND " + clause
                args.append(value)
        sql += " ORDER BY created, job_id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [job_from_row(row) for row in self._db.execute(sql, args)]

    def active_job_counts(self) -> dict[str, int]:
        states = [str(s) for s in ACTIVE_JOB_STATES]
        rows = self._db.execute(
            "SELECT node_id, COUNT(*) FROM jobs WHERE node_id IS NOT NULL AND state IN "
            f"({', '.join('?' * len(states))}) GROUP BY node_id",
            states,
        )
        return {row[0]: row[1] for row in rows}

    def insert_receipt(self, record: ReceiptRecord) -> None:
        try:
            self._db.execute(
                "INSERT INTO receipts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.job_id, record.node_id, dumps(record.envelope), record.prompt_tokens,
                 record.completion_tokens, record.received_at, record.charge,
                 record.payee_account, record.payee_amount, record.platform_amount),
            )
        except sqlite3.IntegrityError:
            raise ReceiptConflictError(f"job {record.job_id!r} already has a receipt") from None

    def get_receipt(self, job_id: str) -> ReceiptRecord | None:
        row = self._one("SELECT * FROM receipts WHERE job_id = ?", job_id)
        if row is None:
            return None
        return ReceiptRecord(row[0], row[1], json.loads(row[2]), *row[3:])

    # --- ledger -------------------------------------------------------------------------------

    def ledger_state(self, accounts: Iterable[str], reservations: Iterable[str]) -> LedgerState:
        res: dict[str, Reservation] = {}
        for rid in set(reservations):
            row = self._one("SELECT account_id, amount FROM reservations "
                            "WHERE reservation_id = ?", rid)
            if row is not None:
                res[rid] = Reservation(rid, row[0], row[1])
        balances: dict[str, int] = {}
        for account in set(accounts) | {r.account for r in res.values()}:
            row = self._one("SELECT balance FROM accounts WHERE account_id = ?", account)
            if row is not None:
                balances[account] = row[0]
        minted = sum(balances.values()) + sum(r.amount for r in res.values())
        return LedgerState(balances=balances, reservations=res, minted=minted)

    def ledger_update(self, before: LedgerState, after: LedgerState) -> None:
        for account, amount in after.balances.items():
            if before.balances.get(account) != amount:
                cur = self._db.execute(
                    "UPDATE accounts SET balance = ? WHERE account_id = ?", (amount, account)
                )
                if cur.rowcount != 1:
                    raise UnknownAccountError(account)
        for rid in before.reservations:
            if rid not in after.reservations:
                self._db.execute("DELETE FROM reservations WHERE reservation_id = ?", (rid,))
        for rid, r in after.reservations.items():
            if before.reservations.get(rid) != r:
                self._db.execute("INSERT OR REPLACE INTO reservations VALUES (?, ?, ?)",
                                 (rid, r.account, r.amount))
        if after.minted != before.minted:
            self._db.execute(
                "UPDATE meta SET value = CAST(CAST(value AS INTEGER) + ? AS TEXT) "
                "WHERE key = 'minted'",
                (after.minted - before.minted,),
            )

    def reserved_total(self, account_id: str) -> int:
        row = self._one("SELECT COALESCE(SUM(amount), 0) FROM reservations WHERE account_id = ?",
                        account_id)
        return int(row[0])

    def ledger_totals(self) -> tuple[int, int, int]:
        minted = int(self._one("SELECT value FROM meta WHERE key = 'minted'")[0])
        balances = int(self._one("SELECT COALESCE(SUM(balance), 0) FROM accounts")[0])
        held = int(self._one("SELECT COALESCE(SUM(amount), 0) FROM reservations")[0])
        return minted, balances, held

    def add_entry(self, entry: LedgerEntry) -> None:
        self._db.execute(
            "INSERT INTO ledger_entries (at, kind, account_id, amount, job_id) "
            "VALUES (?, ?, ?, ?, ?)",
            (entry.at, entry.kind, entry.account_id, entry.amount, entry.job_id),
        )

    def entries(self, account_id: str | None = None) -> list[LedgerEntry]:
        sql = "SELECT at, kind, account_id, amount, job_id, seq FROM ledger_entries"
        rows = (self._db.execute(sql + " WHERE account_id = ? ORDER BY seq", (account_id,))
                if account_id is not None else self._db.execute(sql + " ORDER BY seq"))
        return [LedgerEntry(*row) for row in rows]
