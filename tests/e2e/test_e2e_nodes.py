"""Real node processes (``resultity node serve``) dying, refused, and the Network restarting."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from e2e_harness import Cluster, balance, jobs_of, wait_until

from resultity_core import JobState, NodeGrant, generate_key, sign_grant
from resultity_servers.demo import DEMO_ACCOUNT, PRICE, DemoFiles, DemoOptions, prepare_demo
from resultity_servers.network import job_cost

pytestmark = pytest.mark.slow

READY_S = 90.0


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("model-cache")
    prepare_demo(DemoOptions(data_dir=base, nodes=0, preset="tiny"), log=lambda _m: None)
    return base / "models"


def _files(tmp: Path, models: Path) -> DemoFiles:
    data = tmp / "demo"
    shutil.copytree(models, data / "models")
    return prepare_demo(DemoOptions(data_dir=data, nodes=2, preset="tiny"), log=lambda _m: None)


@pytest.fixture
def cluster(tmp_path: Path, model_cache: Path) -> Iterator[Cluster]:
    c = Cluster(_files(tmp_path, model_cache), tmp_path)
    c.start_servers()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def loose_cluster(tmp_path: Path, model_cache: Path) -> Iterator[Cluster]:
    """A Network that publishes snapshots without checking them (as a compromised one might)."""
    c = Cluster(_files(tmp_path, model_cache), tmp_path, check_snapshots=False)
    c.start_servers()
    try:
        yield c
    finally:
        c.close()


def _client(c: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=c.base_url, api_key=c.api_key, max_retries=0, timeout=90)


def _wait_ready(c: Cluster, count: int) -> set[str]:
    wait_until(lambda: len(c.ready_node_ids()) >= count, READY_S, f"{count} ready node(s)", 0.2)
    return c.ready_node_ids()


def _jobs(c: Cluster) -> list[Any]:
    assert c.portal is not None
    assert c.coordinator is not None
    return jobs_of(c.portal, c.coordinator, DEMO_ACCOUNT)


def _balance(c: Cluster, account: str = DEMO_ACCOUNT) -> tuple[int, int]:
    assert c.portal is not None
    assert c.coordinator is not None
    return balance(c.portal, c.coordinator, account)


def _ask(c: Cluster, out: dict[str, Any], max_tokens: int = 8) -> None:
    try:
        with _client(c) as client:
            out["reply"] = client.chat.completions.create(
                model=c.files.model.name, max_tokens=max_tokens, temperature=0,
                messages=[{"role": "user", "content": "hello"}])
    except Exception as exc:
        out["error"] = exc


def test_a_node_dying_before_its_first_token_is_replaced(cluster: Cluster) -> None:
    cluster.start_node(0)
    (first,) = _wait_ready(cluster, 1)
    before = _balance(cluster)
    cluster.signal_node(0, signal.SIGSTOP)  # frozen with its lease long poll open
    out: dict[str, Any] = {}
    asker = threading.Thread(target=_ask, args=(cluster, out))
    asker.start()
    wait_until(lambda: any(j.node_id == first for j in _jobs(cluster)), 10,
               "the job to be leased to the frozen node")
    cluster.start_node(1)
    cluster.signal_node(0, signal.SIGKILL)
    asker.join(READY_S + 30)
    assert "error" not in out, out.get("error")
    reply = out["reply"]
    assert reply.choices[0].message.content
    wait_until(lambda: _jobs(cluster)[0].settled, 20, "the job to settle")
    (job,) = _jobs(cluster)
    assert job.state == JobState.DONE
    assert job.attempts == 2
    assert job.node_id not in {None, first}
    assert job.charge == job_cost(PRICE, job.prompt_tokens, job.completion_tokens)
    assert _balance(cluster) == (before[0] - job.charge, 0)


def test_a_node_dying_mid_stream_ends_it_with_an_error_and_a_fair_charge(
        cluster: Cluster) -> None:
    cluster.start_node(0)
    _wait_ready(cluster, 1)
    before = _balance(cluster)
    received = 0
    with _client(cluster) as client:
        stream = client.chat.completions.create(
            model=cluster.files.model.name, max_tokens=1500, temperature=1.0, stream=True,
            messages=[{"role": "user", "content": "Write a very long story"}])
        killed = 0.0

        def consume() -> None:
            nonlocal received, killed
            for chunk in stream:
                received += sum(1 for c in chunk.choices if c.delta.content)
                if received == 3:
                    cluster.signal_node(0, signal.SIGKILL)
                    killed = time.monotonic()

        with pytest.raises(openai.APIError) as failed:
            consume()
        assert killed, "the node was never killed"
        took = time.monotonic() - killed
        stream.close()
    assert "node" in str(failed.value).lower()
    assert took < cluster.heartbeat_timeout_s + 5
    wait_until(lambda: _jobs(cluster)[0].settled, 20, "the job to settle")
    (job,) = _jobs(cluster)
    assert job.state == JobState.FAILED
    assert received <= job.completion_tokens < 1500
    assert job.charge == job_cost(PRICE, job.prompt_tokens, job.completion_tokens)
    assert _balance(cluster) == (before[0] - job.charge, 0)


def _ledger(c: Cluster) -> tuple[Any, ...]:
    assert c.coordinator is not None
    coordinator = c.coordinator

    def read() -> tuple[Any, ...]:
        with coordinator.store.transaction() as tx:
            receipts = {j.job_id: tx.get_receipt(j.job_id) for j in tx.list_jobs(list(JobState))}
        accounts = {(b.account_id, b.balance, b.reserved) for b in coordinator.list_accounts()}
        return coordinator.ledger_totals(), accounts, receipts

    return c.call(read)


def test_the_network_restarts_without_losing_credits_or_receipts(cluster: Cluster) -> None:
    cluster.start_node(0)
    _wait_ready(cluster, 1)
    out: dict[str, Any] = {}
    _ask(cluster, out)
    assert "reply" in out, out.get("error")
    wait_until(lambda: all(j.settled for j in _jobs(cluster)), 20, "the job to settle")
    totals, accounts, receipts = _ledger(cluster)
    assert all(r is not None for r in receipts.values())
    assert receipts
    assert totals[0] == totals[1] + totals[2]
    cluster.stop_servers()
    cluster.start_servers()
    assert _ledger(cluster) == (totals, accounts, receipts)
    _wait_ready(cluster, 1)  # the node comes back on its own
    again: dict[str, Any] = {}
    _ask(cluster, again)
    assert "reply" in again, again.get("error")
    usage = again["reply"].usage
    wait_until(lambda: all(j.settled for j in _jobs(cluster)), 20, "the job to settle")
    old = {a: b for a, b, _r in accounts}
    cost = job_cost(PRICE, usage.prompt_tokens, usage.completion_tokens)
    assert _balance(cluster) == (old[DEMO_ACCOUNT] - cost, 0)


def test_a_node_with_a_grant_from_the_wrong_key_is_refused(cluster: Cluster) -> None:
    node_dir = cluster.files.node_dir(1)
    node_key_public = json.loads((node_dir / "node.key").read_text())["public"]
    from resultity_core import PublicKey

    now = int(time.time())
    forged = sign_grant(NodeGrant("demo-operator", PublicKey.from_hex(node_key_public),
                                  now - 60, now + 3600), generate_key())
    (node_dir / "grant.json").write_text(json.dumps(forged.to_payload()))
    proc = cluster.start_node(1)
    assert proc.wait(timeout=60) == 1
    last = cluster.node_log(1).strip().splitlines()[-1]
    assert last.startswith("resultity: error:")
    assert "refused" in last
    assert cluster.ready_node_ids() == set()


def _applied_version(files: DemoFiles) -> int:
    state = json.loads((files.node_dir(0) / "trust-state.json").read_text())
    return int(state["config"]["signed"]["version"])


def test_a_tampered_snapshot_is_refused_and_the_last_good_one_kept(
        loose_cluster: Cluster) -> None:
    c = loose_cluster
    c.start_node(0)
    _wait_ready(c, 1)
    assert _applied_version(c.files) == 1
    bad = c.publish(2, tamper=True)
    wait_until(lambda: "refused snapshot " + bad in c.node_log(0), 30, "the refusal", 0.2)
    assert _applied_version(c.files) == 1
    assert c.procs[0].poll() is None
    c.publish(3)
    _wait_ready(c, 1)
    assert _applied_version(c.files) == 3
    out: dict[str, Any] = {}
    _ask(c, out)
    assert "reply" in out, out.get("error")
