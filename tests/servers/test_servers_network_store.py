"""The Network store contract, run against MemoryStore and SQLiteStore; SQLite durability."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import attrs
import pytest

from resultity_core import (
    PLATFORM_ACCOUNT,
    AccountExistsError,
    Capabilities,
    InsufficientCreditsError,
    JobState,
    NodeState,
    Price,
    UnknownAccountError,
)
from resultity_servers.network import (
    SCHEMA_VERSION,
    AccountRecord,
    ApiKeyRecord,
    GrantRecord,
    JobRecord,
    JobStateError,
    NodeRecord,
    ReceiptConflictError,
    ReceiptRecord,
    SnapshotRecord,
    SQLiteStore,
    Store,
    hash_secret,
)
from resultity_servers.network._money import (
    job_cost,
    ledger_credit,
    ledger_release,
    ledger_reserve,
    ledger_settle,
)

CAPS = Capabilities(("tiny",), 4, "cpu")


def _job(job_id: str, *, created: float = 1.0, node: str | None = None,
         state: JobState = JobState.QUEUED, reserved: int = 100) -> JobRecord:
    return JobRecord(
        job_id=job_id, account_id="alice", model="tiny", request={"prompt": "hi", "n": 1},
        state=state, created=created, max_tokens=16, prompt_tokens_estimate=8,
        price=Price(100, 200), reserved=reserved, node_id=node,
    )


def _node(node_id: str, session: str | None = None) -> NodeRecord:
    return NodeRecord(
        node_id=node_id, public_key="ab" * 32, account_id="bob", state=NodeState.READY,
        registered_at=1.0, last_heartbeat=2.0, capabilities=CAPS, config_hash=None,
        session_hash=session, session_expires=100.0,
    )


def _totals_conserved(store: Store) -> tuple[int, int, int]:
    with store.transaction() as tx:
        minted, balances, held = tx.ledger_totals()
    assert minted == balances + held
    return minted, balances, held


def test_accounts_and_api_keys(network_store: Store) -> None:
    with network_store.transaction() as tx:
        tx.insert_account(AccountRecord("alice", 5.0, "cd" * 32))
        tx.insert_api_key(ApiKeyRecord(hash_secret("rk-secret"), "alice", 5.0, "rk-secre"))
    with network_store.transaction() as tx:
        assert tx.get_account("alice") == AccountRecord("alice", 5.0, "cd" * 32)
        assert [a.account_id for a in tx.list_accounts()] == ["alice", PLATFORM_ACCOUNT]
        key = tx.get_api_key(hash_secret("rk-secret"))
        assert key is not None
        assert key.account_id == "alice"
        assert tx.get_api_key(hash_secret("rk-other")) is None
        with pytest.raises(AccountExistsError):
            tx.insert_account(AccountRecord("alice", 6.0))
        tx.update_account(AccountRecord("alice", 5.0, None))
        assert tx.get_account("alice") == AccountRecord("alice", 5.0, None)
        with pytest.raises(UnknownAccountError):
            tx.update_account(AccountRecord("nobody", 1.0))


def test_nodes_sessions_grants_snapshots(network_store: Store) -> None:
    with network_store.transaction() as tx:
        tx.put_node(_node("n1", session="s1"))
        tx.put_node(_node("n2"))
        tx.put_grant(GrantRecord("n1", "bob", {"signed": {"_type": "node-grant"}}, 1, 9))
        tx.put_snapshot(SnapshotRecord("sha256:" + "1" * 64, {"signed": {"v": 1}}, 1, 3.0))
        assert tx.current_snapshot() is None
        tx.set_current_snapshot("sha256:" + "1" * 64)
        with pytest.raises(KeyError):
            tx.set_current_snapshot("sha256:" + "2" * 64)
    with network_store.transaction() as tx:
        node = tx.node_by_session("s1")
        assert node == _node("n1", session="s1")
        assert node.capabilities == CAPS
        # A new session replaces the old one: the old token stops finding the node.
        tx.put_node(_node("n1", session="s2"))
        assert tx.node_by_session("s1") is None
        assert tx.node_by_session("s2") is not None
        assert [n.node_id for n in tx.list_nodes()] == ["n1", "n2"]
        grant = tx.get_grant("n1")
        assert grant is not None
        assert grant.envelope == {"signed": {"_type": "node-grant"}}
        current = tx.current_snapshot()
        assert current is not None
        assert current.version == 1
        assert current.envelope == {"signed": {"v": 1}}


def test_jobs_filters_order_and_counts(network_store: Store) -> None:
    with network_store.transaction() as tx:
        tx.insert_job(_job("b", created=2.0))
        tx.insert_job(_job("a", created=3.0, node="n1"))
        tx.insert_job(_job("c", created=1.0, node="n1", state=JobState.LEASED))
        tx.insert_job(_job("d", created=0.5, node="n2", state=JobState.DONE))
        with pytest.raises(JobStateError):
            tx.insert_job(_job("a"))
    with network_store.transaction() as tx:
        queued = tx.list_jobs([JobState.QUEUED])
        assert [j.job_id for j in queued] == ["b", "a"]
        assert [j.job_id for j in tx.list_jobs([JobState.QUEUED], unassigned=True)] == ["b"]
        active = tx.list_jobs([JobState.QUEUED, JobState.LEASED], node_id="n1")
        assert [j.job_id for j in active] == ["c", "a"]
        assert [j.job_id for j in tx.list_jobs([JobState.QUEUED], limit=1)] == ["b"]
        assert tx.active_job_counts() == {"n1": 2}
        job = tx.get_job("a")
        assert job == _job("a", created=3.0, node="n1")
        tx.update_job(_job("a", created=3.0, node="n1", state=JobState.DONE))
        assert [j.job_id for j in tx.list_jobs([JobState.DONE], unsettled=True)] == ["d", "a"]
        assert tx.get_job("zzz") is None


def test_jobs_time_filters(network_store: Store) -> None:
    with network_store.transaction() as tx:
        tx.insert_job(_job("old", created=1.0))
        tx.insert_job(_job("new", created=5.0))
        tx.insert_job(attrs.evolve(_job("due", created=1.0, state=JobState.LEASED), deadline=3.0))
        tx.insert_job(_job("free", created=1.0, state=JobState.LEASED))  # no deadline
        tx.insert_job(attrs.evolve(_job("done", state=JobState.DONE), finished_at=4.0))
        tx.insert_job(_job("done0", state=JobState.DONE))  # finished_at missing: counts as 0
    with network_store.transaction() as tx:
        def ids(jobs: list[JobRecord]) -> list[str]:
            return [j.job_id for j in jobs]

        assert ids(tx.list_jobs([JobState.QUEUED], created_before=5.0)) == ["old"]
        assert ids(tx.list_jobs([JobState.QUEUED], created_before=5.5)) == ["old", "new"]
        assert ids(tx.list_jobs([JobState.LEASED], deadline_before=3.0)) == []
        assert ids(tx.list_jobs([JobState.LEASED], deadline_before=3.5)) == ["due"]
        assert ids(tx.list_jobs([JobState.DONE], finished_before=4.0)) == ["done0"]
        assert sorted(ids(tx.list_jobs([JobState.DONE], unsettled=True,
                                       finished_before=4.5))) == ["done", "done0"]


def test_receipts_are_unique_per_job(network_store: Store) -> None:
    record = ReceiptRecord("j1", "n1", {"signed": {"x": 1}}, 3, 4, 9.0, 50, "bob", 40, 10)
    with network_store.transaction() as tx:
        tx.insert_receipt(record)
        with pytest.raises(ReceiptConflictError):
            tx.insert_receipt(record)
    with network_store.transaction() as tx:
        assert tx.get_receipt("j1") == record
        assert tx.get_receipt("j2") is None


def test_ledger_reserve_settle_release_conserve(network_store: Store) -> None:
    with network_store.transaction() as tx:
        tx.insert_account(AccountRecord("alice", 1.0))
        tx.insert_account(AccountRecord("bob", 1.0))
        ledger_credit(tx, "alice", 10_000, 1.0)
        tx.insert_job(_job("j1", reserved=1_000))
        tx.insert_job(_job("j2", reserved=500))
        ledger_reserve(tx, "j1", "alice", 1_000, 2.0)
        ledger_reserve(tx, "j2", "alice", 500, 2.0)
    assert _totals_conserved(network_store) == (10_000, 8_500, 1_500)
    with network_store.transaction() as tx:
        assert tx.reserved_total("alice") == 1_500
        job = tx.get_job("j1")
        assert job is not None
        settled, s = ledger_settle(tx, job, prompt_tokens=10, completion_tokens=20,
                                   payee_account="bob", payee_share_bps=8_000, now=3.0)
        # 10 * 100 + 20 * 200 = 5000 milli-credits -> 5 micro-credits.
        assert s.payer_charge == job_cost(Price(100, 200), 10, 20) == 5
        assert (s.payee_amount, s.platform_amount, s.refunded) == (4, 1, 995)
        assert settled.settled
        assert settled.charge == 5
        job2 = tx.get_job("j2")
        assert job2 is not None
        assert ledger_release(tx, job2, 3.0).charge == 0
    with network_store.transaction() as tx:
        state = tx.ledger_state(["alice", "bob", PLATFORM_ACCOUNT], [])
        assert dict(state.balances) == {"alice": 9_995, "bob": 4, PLATFORM_ACCOUNT: 1}
        assert tx.reserved_total("alice") == 0
        kinds = [e.kind for e in tx.entries("alice")]
        assert kinds == ["credit", "reserve", "reserve", "refund", "release"]
        assert [e.seq for e in tx.entries()] == sorted(e.seq for e in tx.entries())
    assert _totals_conserved(network_store) == (10_000, 10_000, 0)


def test_rollback_leaves_everything_unchanged(network_store: Store) -> None:
    with network_store.transaction() as tx:
        tx.insert_account(AccountRecord("alice", 1.0))
        ledger_credit(tx, "alice", 100, 1.0)
    before = _totals_conserved(network_store)

    def doomed() -> None:
        with network_store.transaction() as tx:
            tx.insert_job(_job("j1"))
            tx.put_node(_node("n1", session="s"))
            ledger_credit(tx, "alice", 50, 2.0)
            ledger_reserve(tx, "j1", "alice", 1_000, 2.0)

    with pytest.raises(InsufficientCreditsError):
        doomed()
    with network_store.transaction() as tx:
        assert tx.get_job("j1") is None
        assert tx.get_node("n1") is None
        assert tx.node_by_session("s") is None
        assert tx.ledger_state(["alice"], []).balance("alice") == 100
        assert [e.kind for e in tx.entries("alice")] == ["credit"]
    assert _totals_conserved(network_store) == before


def test_sqlite_is_durable_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "network.db"
    store = SQLiteStore(path, synchronous="FULL")
    assert store.schema_version == SCHEMA_VERSION
    with store.transaction() as tx:
        tx.insert_account(AccountRecord("alice", 1.0, "cd" * 32))
        tx.insert_account(AccountRecord("bob", 1.0))
        tx.insert_api_key(ApiKeyRecord(hash_secret("rk-a"), "alice", 1.0, "rk-a"))
        ledger_credit(tx, "alice", 1_000, 1.0)
        tx.insert_job(_job("j1", reserved=300))
        ledger_reserve(tx, "j1", "alice", 300, 2.0)
        tx.insert_receipt(ReceiptRecord("j0", "n1", {"signed": {"a": [1, "é"]}}, 1, 2, 3.0))
        tx.put_snapshot(SnapshotRecord("sha256:" + "3" * 64, {"signed": {}}, 4, 3.0))
        tx.set_current_snapshot("sha256:" + "3" * 64)
    store.close()

    reopened = SQLiteStore(path)
    with reopened.transaction() as tx:
        assert tx.get_account("alice") == AccountRecord("alice", 1.0, "cd" * 32)
        assert tx.get_api_key(hash_secret("rk-a")) is not None
        assert tx.ledger_state(["alice"], []).balance("alice") == 700
        assert tx.reserved_total("alice") == 300
        receipt = tx.get_receipt("j0")
        assert receipt is not None
        assert receipt.envelope == {"signed": {"a": [1, "é"]}}
        job = tx.get_job("j1")
        assert job is not None
        assert job.request == {"prompt": "hi", "n": 1}
        snap = tx.current_snapshot()
        assert snap is not None
        assert snap.version == 4
        assert tx.ledger_totals() == (1_000, 700, 300)
    mode = reopened._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    reopened.close()


def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "network.db"
    SQLiteStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="newer"):
        SQLiteStore(path)
