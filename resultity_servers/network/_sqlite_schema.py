"""The SQLite schema of the Network's store, its migrations, and row <-> record converters.

``MIGRATIONS[i]`` takes a database from ``PRAGMA user_version`` ``i`` to ``i + 1``; a new
schema change is a new entry (never an edit of a released one).
"""

from __future__ import annotations

import functools
import json
import sqlite3
from typing import Any

from resultity_core import PLATFORM_ACCOUNT, Capabilities, JobState, NodeState, Price

from ._records import JobRecord, NodeRecord

__all__ = [
    "JOB_COLUMNS",
    "MIGRATIONS",
    "NODE_COLUMNS",
    "SCHEMA_VERSION",
    "dumps",
    "job_from_row",
    "node_from_row",
]

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE accounts (
        account_id TEXT PRIMARY KEY, created REAL NOT NULL, public_key TEXT,
        balance INTEGER NOT NULL DEFAULT 0 CHECK (balance >= 0));
    CREATE TABLE api_keys (
        key_hash TEXT PRIMARY KEY, account_id TEXT NOT NULL REFERENCES accounts(account_id),
        created REAL NOT NULL, prefix TEXT NOT NULL);
    CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY, public_key TEXT NOT NULL, account_id TEXT NOT NULL,
        state TEXT NOT NULL, registered_at REAL NOT NULL, last_heartbeat REAL NOT NULL,
        capabilities TEXT NOT NULL, config_hash TEXT, active_jobs INTEGER NOT NULL,
        free_slots INTEGER NOT NULL, session_hash TEXT UNIQUE, session_expires REAL NOT NULL);
    CREATE TABLE grants (
        node_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, envelope TEXT NOT NULL,
        issued_at INTEGER NOT NULL, expires_at INTEGER NOT NULL);
    CREATE TABLE snapshots (
        config_hash TEXT PRIMARY KEY, envelope TEXT NOT NULL, version INTEGER NOT NULL,
        published_at REAL NOT NULL);
    CREATE TABLE jobs (
        job_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, model TEXT NOT NULL,
        request TEXT NOT NULL, state TEXT NOT NULL, created REAL NOT NULL,
        max_tokens INTEGER NOT NULL, prompt_tokens_estimate INTEGER NOT NULL,
        price_prompt INTEGER NOT NULL, price_completion INTEGER NOT NULL,
        reserved INTEGER NOT NULL, choices INTEGER NOT NULL, node_id TEXT,
        attempts INTEGER NOT NULL,
        first_token_at REAL, finished_at REAL, deadline REAL,
        prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
        charge INTEGER, settled INTEGER NOT NULL, error TEXT);
    CREATE INDEX jobs_state ON jobs (state, node_id, created);
    CREATE INDEX jobs_unsettled ON jobs (state, created) WHERE settled = 0;

    CREATE TABLE receipts (
        job_id TEXT PRIMARY KEY, node_id TEXT NOT NULL, envelope TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
        received_at REAL NOT NULL, charge INTEGER, payee_account TEXT,
        payee_amount INTEGER NOT NULL, platform_amount INTEGER NOT NULL);
    CREATE TABLE reservations (
        reservation_id TEXT PRIMARY KEY, account_id TEXT NOT NULL,
        amount INTEGER NOT NULL CHECK (amount >= 0));
    CREATE INDEX reservations_account ON reservations (account_id);
    CREATE TABLE ledger_entries (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, kind TEXT NOT NULL,
        account_id TEXT NOT NULL, amount INTEGER NOT NULL, job_id TEXT);
    CREATE INDEX ledger_entries_account ON ledger_entries (account_id, seq);
    INSERT INTO meta VALUES ('minted', '0');
    INSERT INTO accounts (account_id, created) VALUES ('platform', 0);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
assert PLATFORM_ACCOUNT == "platform"

JOB_COLUMNS = (
    "job_id, account_id, model, request, state, created, max_tokens, prompt_tokens_estimate, "
    "price_prompt, price_completion, reserved, choices, node_id, attempts, first_token_at, "
    "finished_at, deadline, prompt_tokens, completion_tokens, charge, settled, error"
)
NODE_COLUMNS = (
    "node_id, public_key, account_id, state, registered_at, last_heartbeat, capabilities, "
    "config_hash, active_jobs, free_slots, session_hash, session_expires"
)


def dumps(value: Any) -> str:
    """Return compact, key-sorted JSON text (UTF-8 kept) for a JSON column."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def job_from_row(row: sqlite3.Row) -> JobRecord:
    """Return the JobRecord of a row selected with ``JOB_COLUMNS``."""
    return JobRecord(
        job_id=row[0], account_id=row[1], model=row[2], request=json.loads(row[3]),
        state=JobState(row[4]), created=row[5], max_tokens=row[6],
        prompt_tokens_estimate=row[7], price=Price(row[8], row[9]), reserved=row[10],
        choices=row[11], node_id=row[12], attempts=row[13], first_token_at=row[14],
        finished_at=row[15], deadline=row[16], prompt_tokens=row[17], completion_tokens=row[18],
        charge=row[19], settled=bool(row[20]), error=row[21],
    )


@functools.lru_cache(maxsize=4096)
def _capabilities(text: str) -> Capabilities:
    # Every routing decision reads every node row, and a node's capabilities text rarely
    # changes: parse each distinct text once (Capabilities is frozen, so it can be shared).
    return Capabilities.from_payload(json.loads(text))


def node_from_row(row: sqlite3.Row) -> NodeRecord:
    """Return the NodeRecord of a row selected with ``NODE_COLUMNS``."""
    return NodeRecord(
        node_id=row[0], public_key=row[1], account_id=row[2], state=NodeState(row[3]),
        registered_at=row[4], last_heartbeat=row[5],
        capabilities=_capabilities(row[6]), config_hash=row[7],
        active_jobs=row[8], free_slots=row[9], session_hash=row[10], session_expires=row[11],
    )


