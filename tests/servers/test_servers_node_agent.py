"""The Agent against a fake Network transport, with the fake Runtime child."""

from __future__ import annotations

import json
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

from resultity_core import (
    Challenge,
    ChallengeResponse,
    Envelope,
    Heartbeat,
    JobEvent,
    Lease,
    LeaseBatch,
    LeaseRequest,
    ModelEntry,
    NetworkParams,
    NodeConfig,
    NodeGrant,
    NodeTrustState,
    Participation,
    Price,
    PublicKey,
    ReceiptSubmit,
    RegisterRequest,
    Resources,
    RuntimeParams,
    SecretKey,
    canonical_digest,
    generate_key,
    make_root,
    sign_envelope,
    sign_grant,
    verify_receipt,
)
from resultity_servers.node import (
    Agent,
    HeartbeatAnswer,
    NodeSettings,
    build_agent,
    job_output_hash,
    model_entry_for_dir,
    prepare_node_dir,
)

FAKE = Path(__file__).with_name("test_servers_node_fakeruntime.py")
pytestmark = pytest.mark.anyio


class FakeNetwork:
    """An in-memory NetworkTransport that records what the Agent sends."""

    def __init__(self, config_key: SecretKey) -> None:
        self.config_key = config_key
        self.snapshots: dict[str, dict[str, Any]] = {}
        self.pointer: str | None = None
        self.registrations: list[RegisterRequest] = []
        self.beats: list[Heartbeat] = []
        self.events: list[JobEvent] = []
        self.receipts: list[dict[str, Any]] = []
        self.cancel: set[str] = set()
        self.queue: list[Lease] = []
        self.nonce = ""

    def publish(self, config: NodeConfig, *,
                tamper: Callable[[dict[str, Any]], None] | None = None) -> str:
        env = sign_envelope(config.to_payload(), [self.config_key]).to_payload()
        if tamper is not None:
            tamper(env["signed"])
        digest = canonical_digest(env["signed"])
        self.snapshots[digest] = env
        self.pointer = digest
        return digest

    def submit(self, request: dict[str, Any], *, model: str = "echo") -> str:
        job_id = "job-" + secrets.token_hex(4)
        self.queue.append(Lease(job_id, model, request, int((time.time() + 30) * 1000)))
        return job_id

    async def register(self, request: RegisterRequest) -> Challenge:
        self.registrations.append(request)
        self.nonce = secrets.token_hex(16)
        return Challenge(self.nonce)

    async def complete_registration(self, response: ChallengeResponse) -> str:
        public = PublicKey.from_hex(self.registrations[-1].node_public_key)
        public.verify(bytes.fromhex(self.nonce), bytes.fromhex(response.signature))
        return response.node_id

    async def heartbeat(self, beat: Heartbeat) -> HeartbeatAnswer:
        self.beats.append(beat)
        cancel, self.cancel = tuple(sorted(self.cancel)), set()
        return HeartbeatAnswer("ready", self.pointer, cancel)

    async def fetch_snapshot(self, config_hash: str) -> dict[str, Any]:
        return self.snapshots[config_hash]

    async def lease(self, request: LeaseRequest) -> LeaseBatch:
        with anyio.move_on_after(min(request.wait_ms / 1000, 0.1)):
            while not self.queue:
                await anyio.sleep(0.01)
        batch, self.queue = self.queue[:request.max_jobs], self.queue[request.max_jobs:]
        return LeaseBatch(tuple(batch))

    async def post_events(self, events: Sequence[JobEvent]) -> tuple[str, ...]:
        self.events.extend(events)
        cancel, self.cancel = tuple(sorted(self.cancel)), set()
        return cancel

    async def submit_receipt(self, submit: ReceiptSubmit) -> dict[str, Any]:
        self.receipts.append(submit.receipt)
        return {}

    async def aclose(self) -> None:
        pass

    def job_events(self, job_id: str) -> list[JobEvent]:
        return [e for e in self.events if e.job_id == job_id]


@attrs.frozen
class Node:
    settings: NodeSettings
    network: FakeNetwork
    key: SecretKey
    entry: ModelEntry
    log: Path

    def config(self, version: int, *, entry: ModelEntry | None = None) -> NodeConfig:
        now = int(time.time())
        return NodeConfig(
            version=version, issued_at=now - 10, expires_at=now + 3600,
            models=(entry or self.entry,),
            runtime=RuntimeParams("auto", 4, 256, 0),
            network=NetworkParams(("http://127.0.0.1:9",), 100, 1000, 10_000),
            participation=Participation(True, 4, 1000),
            resources=Resources(0, 0, 0),
        )

    def agent(self) -> Agent:
        return build_agent(self.settings, transport=self.network)

    def fake_log(self, prefix: str) -> list[str]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [line for line in lines if line.startswith(prefix)]


@pytest.fixture
def node(tmp_path: Path) -> Node:
    data = tmp_path / "node"
    key, account, config_key = generate_key(), generate_key(), generate_key()
    now = int(time.time())
    grant = sign_grant(NodeGrant("acct-1", key.public_key, now - 10, now + 3600), account)
    root_key = generate_key()
    root = make_root(version=1, expires_at=now + 86_400, role_keys={
        "root": [root_key.public_key], "config": [config_key.public_key],
        "release": [root_key.public_key], "network": [root_key.public_key]})
    prepare_node_dir(data, node_key=key, grant=grant,
                     trust_root=sign_envelope(root.to_payload(), [root_key]))
    model_dir = data / "models" / "echo" / "1"
    model_dir.mkdir(parents=True)
    (model_dir / "weights.bin").write_bytes(secrets.token_bytes(3000))
    (model_dir / "config.json").write_text("{}")
    entry = model_entry_for_dir(model_dir, "echo", "1", Price(100, 200))
    log = tmp_path / "fake.log"
    settings = NodeSettings(
        network_url="http://unused", data_dir=data, lease_wait_ms=200,
        runtime_command=(sys.executable, str(FAKE), "ok", str(log)), health_interval_s=1.0,
    )
    return Node(settings, FakeNetwork(config_key), key, entry, log)


@asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    async with anyio.create_task_group() as tg:
        tg.start_soon(agent.run)
        yield agent
        tg.cancel_scope.cancel()


async def until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


async def serving(agent: Agent, config_hash: str) -> None:
    await until(lambda: agent.reported_hash == config_hash and agent.can_lease()
                and agent.registered_models == ("echo",))


async def test_registers_applies_the_config_and_serves_the_model(node: Node) -> None:
    h1 = node.network.publish(node.config(1))
    agent = node.agent()
    async with running(agent):
        await serving(agent, h1)
        await until(lambda: node.network.beats[-1].config_hash == h1)
        assert node.network.registrations[-1].capabilities.models == ("echo",)
        assert node.network.beats[-1].status == "ready"
        assert node.network.beats[-1].free_slots == 4
    state_file = node.settings.data_dir / "trust-state.json"
    assert state_file.stat().st_mode & 0o777 == 0o600
    restored = NodeTrustState.restore(json.loads(state_file.read_text()))
    assert restored.current_hash == h1
    installed = node.settings.data_dir / "installed" / "echo" / "1"
    assert (installed / "weights.bin").read_bytes() == (
        node.settings.data_dir / "models" / "echo" / "1" / "weights.bin").read_bytes()


async def test_refuses_a_tampered_snapshot_and_keeps_the_last_good_one(node: Node) -> None:
    h1 = node.network.publish(node.config(1))
    agent = node.agent()
    async with running(agent):
        await serving(agent, h1)

        def more_jobs(signed: dict[str, Any]) -> None:
            signed["participation"]["max_concurrent_jobs"] = 99

        h2 = node.network.publish(node.config(2), tamper=more_jobs)
        await until(lambda: h2 in agent.refused)
        assert "BadSignatureError" in agent.refused[h2]
        # a pointer whose snapshot is not the one it names
        node.network.snapshots["sha256:" + "1" * 64] = node.network.snapshots[h1]
        node.network.pointer = "sha256:" + "1" * 64
        await until(lambda: node.network.pointer in agent.refused)
        assert "HashMismatchError" in agent.refused[node.network.pointer]
        assert agent.trust.current_hash == h1
        assert agent.capacity == 4
        assert agent.can_lease()
        job = node.network.submit({"model": "echo", "prompt": "still here", "max_tokens": 2})
        await until(lambda: any(e.kind == "done" for e in node.network.job_events(job)))


async def test_refuses_rollback_also_after_a_restart(node: Node) -> None:
    v1 = node.config(1)
    h1 = node.network.publish(v1)
    h2 = node.network.publish(node.config(2))
    agent = node.agent()
    async with running(agent):
        await serving(agent, h2)
        node.network.pointer = h1
        await until(lambda: h1 in agent.refused)
        assert "RollbackError" in agent.refused[h1]
        assert agent.trust.current_hash == h2
    restarted = node.agent()
    assert restarted.trust.current_hash == h2  # restored from the data dir
    async with running(restarted):
        await until(lambda: h1 in restarted.refused)
        assert "RollbackError" in restarted.refused[h1]
        await serving(restarted, h2)


async def test_installs_a_model_only_when_its_sha256_matches(node: Node) -> None:
    first = node.entry.files[0]
    bad_file = attrs.evolve(first, sha256="sha256:" + "0" * 64)
    bad = attrs.evolve(node.entry, files=(bad_file, *node.entry.files[1:]))
    h1 = node.network.publish(node.config(1, entry=bad))
    agent = node.agent()
    async with running(agent):
        await until(lambda: agent.reported_hash == h1)
        assert "sha256" in agent.install_errors["echo"]
        assert agent.runtimes == {}
        assert not agent.can_lease()
        assert not (node.settings.data_dir / "installed" / "echo" / "1").exists()
        assert node.fake_log("start") == []
        h2 = node.network.publish(node.config(2))
        await serving(agent, h2)
        assert agent.install_errors == {}
        assert len(node.fake_log("start")) == 1


async def test_runs_jobs_and_submits_verifiable_receipts(node: Node) -> None:
    h1 = node.network.publish(node.config(1))
    agent = node.agent()
    async with running(agent):
        await serving(agent, h1)
        chat = {"model": "echo", "messages": [{"role": "user", "content": "hello node"}],
                "max_tokens": 4, "temperature": "0.5"}
        batch = {"model": "echo", "prompt": ["a b", "c d e"], "max_tokens": 2}
        chat_id, batch_id = node.network.submit(chat), node.network.submit(batch)
        await until(lambda: len(node.network.receipts) == 2)
    events = node.network.job_events(chat_id)
    assert [e.seq for e in events] == list(range(len(events)))
    assert "".join(e.text for e in events if e.kind == "token") == "hello node hello node"
    done = events[-1]
    assert (done.kind, done.index, done.finish_reason) == ("done", 0, "length")
    assert done.usage is not None
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (2, 4)
    receipts = {r["signed"]["job_id"]: r for r in node.network.receipts}
    receipt = verify_receipt(Envelope.from_payload(receipts[chat_id]), node.key.public_key,
                             expected_node_id=node.key.keyid)
    assert receipt.request_hash == canonical_digest(chat)
    assert receipt.output_hash == job_output_hash(["hello node hello node"], ["length"])
    assert (receipt.prompt_tokens, receipt.completion_tokens) == (2, 4)
    batch_events = node.network.job_events(batch_id)
    texts = ["", ""]
    for e in batch_events:
        if e.kind == "token":
            texts[e.index] += e.text
    assert texts == ["a b", "c d"]
    assert sorted(e.index for e in batch_events if e.kind == "done") == [0, 1]
    batch_receipt = verify_receipt(Envelope.from_payload(receipts[batch_id]),
                                   node.key.public_key)
    assert batch_receipt.output_hash == job_output_hash(texts, ["length", "length"])
    assert (batch_receipt.prompt_tokens, batch_receipt.completion_tokens) == (5, 4)
    assert sorted(node.fake_log("generate")) == sorted(
        [f"generate {chat_id}", f"generate {batch_id}.p0", f"generate {batch_id}.p1"])


async def test_cancel_reaches_the_runtime_within_a_second(node: Node) -> None:
    h1 = node.network.publish(node.config(1))
    agent = node.agent()
    async with running(agent):
        await serving(agent, h1)
        job = node.network.submit({"model": "echo", "prompt": "go on", "max_tokens": 100_000})
        await until(lambda: len(node.network.job_events(job)) >= 3)
        start = time.monotonic()
        node.network.cancel.add(job)
        await until(lambda: node.fake_log("abort") == [f"abort {job}"], timeout=5)
        elapsed = time.monotonic() - start
        await until(lambda: len(node.network.receipts) == 1)
    assert elapsed < 1.0
    events = node.network.job_events(job)
    assert all(e.kind == "token" for e in events)
    receipt = verify_receipt(Envelope.from_payload(node.network.receipts[0]),
                             node.key.public_key)
    assert 3 <= receipt.completion_tokens < 100_000


async def test_bad_jobs_end_with_an_error_event(node: Node) -> None:
    h1 = node.network.publish(node.config(1))
    agent = node.agent()
    async with running(agent):
        await serving(agent, h1)
        bad = node.network.submit({"model": "echo", "max_tokens": 3})
        unknown = node.network.submit({"model": "other", "prompt": "x"}, model="other")
        refused = node.network.submit({"model": "echo", "prompt": "an error please"})
        await until(lambda: all(node.network.job_events(j) for j in (bad, unknown, refused)))
        await until(lambda: len(node.network.receipts) == 1)
    for job, text in ((bad, "bad request"), (unknown, "not served"), (refused, "refused")):
        (event,) = node.network.job_events(job)
        assert event.kind == "error"
        assert text in (event.error or "")
    assert node.network.receipts[0]["signed"]["job_id"] == refused


async def test_a_new_config_restarts_changed_runtimes_and_stops_removed_ones(node: Node
                                                                          ) -> None:
    h1 = node.network.publish(node.config(1))
    agent = node.agent()
    async with running(agent):
        await serving(agent, h1)
        first = agent.runtimes["echo"].supervisor
        h2 = node.network.publish(attrs.evolve(node.config(2),
                                               runtime=RuntimeParams("torch", 2, 128, 0)))
        await serving(agent, h2)
        second = agent.runtimes["echo"].supervisor
        assert second is not first
        assert second.model is not None
        assert (second.model.backend, second.model.max_num_seqs) == ("torch", 2)
        await until(lambda: first.state == "stopped")
        h3 = node.network.publish(attrs.evolve(node.config(3), models=()))
        await until(lambda: agent.reported_hash == h3 and agent.registered_models == ())
        assert agent.runtimes == {}
        assert not agent.can_lease()
        await until(lambda: second.state == "stopped")
    assert node.network.registrations[-1].capabilities.models == ()
    assert len(node.fake_log("start")) == 2


async def test_takes_its_capacity_from_the_config_unless_the_operator_caps_it(node: Node
                                                                             ) -> None:
    eight = attrs.evolve(node.config(1), runtime=RuntimeParams("auto", 8, 256, 0),
                         participation=Participation(True, 8, 1000))
    h1 = node.network.publish(eight)
    agent = node.agent()
    async with running(agent):
        await serving(agent, h1)
        assert agent.capacity == 8
        await until(lambda: node.network.registrations[-1].capabilities.max_batch == 8)
        # a config whose runtime batch is smaller lowers it; the node registers again
        h2 = node.network.publish(attrs.evolve(eight, version=2,
                                               runtime=RuntimeParams("auto", 3, 256, 0)))
        await serving(agent, h2)
        assert agent.capacity == 3
        await until(lambda: node.network.registrations[-1].capabilities.max_batch == 3)
    capped = attrs.evolve(node, settings=attrs.evolve(node.settings, max_concurrent_jobs=2))
    capped_agent = capped.agent()
    async with running(capped_agent):
        await serving(capped_agent, h2)
        assert capped_agent.capacity == 2
        assert node.network.registrations[-1].capabilities.max_batch == 2


async def test_a_leased_job_reaches_the_runtime_before_the_next_poll_and_beat(node: Node
                                                                             ) -> None:
    h1 = node.network.publish(node.config(1))
    agent = node.agent()
    seen: list[tuple[str, bool]] = []
    lease, heartbeat = node.network.lease, node.network.heartbeat

    async def watched_lease(request: LeaseRequest) -> LeaseBatch:
        seen.extend(("lease", job.handed.is_set()) for job in agent.active.values())
        return await lease(request)

    async def watched_heartbeat(beat: Heartbeat) -> HeartbeatAnswer:
        seen.extend(("beat", job.handed.is_set()) for job in agent.active.values())
        return await heartbeat(beat)

    node.network.lease = watched_lease  # type: ignore[method-assign]
    node.network.heartbeat = watched_heartbeat  # type: ignore[method-assign]
    async with running(agent):
        await serving(agent, h1)
        jobs = [node.network.submit({"model": "echo", "prompt": "one two three",
                                     "max_tokens": 3}) for _ in range(2)]
        await until(lambda: len(node.network.receipts) == 2)
    assert {e.job_id for e in node.network.events} == set(jobs)
    assert ("lease", True) in seen
    assert all(handed for _, handed in seen), seen  # polls and beats, if any came


async def test_the_configs_dtype_and_quantization_reach_the_runtime(node: Node) -> None:
    chosen = attrs.evolve(node.config(1), runtime=RuntimeParams(
        "auto", 4, 256, 0, dtype="bfloat16", quantization="int4"))
    agent = node.agent()
    async with running(agent):
        await serving(agent, node.network.publish(chosen))
        (served,) = agent.runtimes.values()
        assert served.supervisor.model is not None
        assert (served.supervisor.model.dtype, served.supervisor.model.quantization) == (
            "bfloat16", "int4")
        # back to the defaults: a new Runtime loads the model with the engine's own choices
        plain = attrs.evolve(chosen, version=2, runtime=RuntimeParams("auto", 4, 256, 0))
        await serving(agent, node.network.publish(plain))
        await until(lambda: next(iter(agent.runtimes.values())) is not served)
        (fresh,) = agent.runtimes.values()
        assert fresh.supervisor.model is not None
        assert (fresh.supervisor.model.dtype, fresh.supervisor.model.quantization) == (
            None, None)
