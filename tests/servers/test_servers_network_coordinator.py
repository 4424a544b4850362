"""The Network coordinator (sans-IO) on both store backends: admission, routing, failures,
receipts and the money they move."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from resultity_core import (
    PLATFORM_ACCOUNT,
    Capabilities,
    ChallengeResponse,
    Heartbeat,
    InsufficientQuotaError,
    JobEvent,
    JobState,
    JobUsage,
    ModelNotFoundError,
    NoCapacityError,
    NodeGrant,
    NodeState,
    Receipt,
    RegisterRequest,
    ResultityError,
    SecretKey,
    canonical_digest,
    example_node_config,
    generate_key,
    make_root,
    sign_envelope,
    sign_grant,
    sign_receipt,
)
from resultity_servers.network import (
    AdmissionError,
    Coordinator,
    CoordinatorSettings,
    JobStateError,
    MemoryStore,
    NodeAuthError,
    ReceiptConflictError,
    ReceiptError,
    SQLiteStore,
    Store,
    UnknownJobError,
    job_cost,
)

T0 = 1_700_000_000.0
PRICE = example_node_config(now=int(T0)).models[0].price  # tiny: 100 / 200 per 1k


def _config_envelope(version: int = 1, *, key: SecretKey | None = None,
                     max_concurrent: int = 4) -> Any:
    config = example_node_config(now=int(T0), version=version)
    second = attrs.evolve(config.models[0], name="other")
    config = attrs.evolve(
        config, models=(*config.models, second),
        participation=attrs.evolve(config.participation, max_concurrent_jobs=max_concurrent),
    )
    return sign_envelope(config.to_payload(), [key or generate_key()])


class World:
    """A coordinator with a published config, a node owner (bob) and a requester (alice)."""

    def __init__(self, store: Store, **settings: Any) -> None:
        self.settings = CoordinatorSettings(**settings)
        self.c = Coordinator(store, self.settings)
        self.now = T0
        self.config_hash = self.c.publish_config(_config_envelope(), self.now)
        self.owner_key = generate_key()
        self.c.create_account(self.now, account_id="bob", public_key=self.owner_key.public_key)
        _, self.alice_key = self.c.create_account(self.now, account_id="alice",
                                                  initial_credits=1_000_000)
        self.node_keys: dict[str, SecretKey] = {}
        self.sessions: dict[str, str] = {}

    def grant(self, node_key: SecretKey, *, account_key: SecretKey | None = None,
              account: str = "bob", expires_in: int = 3600) -> dict[str, Any]:
        grant = NodeGrant(account, node_key.public_key, int(self.now) - 10,
                          int(self.now) + expires_in)
        return sign_grant(grant, account_key or self.owner_key).to_payload()

    def register(self, node_key: SecretKey, grant: dict[str, Any] | None = None,
                 models: tuple[str, ...] = ("tiny",), max_batch: int = 4) -> str:
        request = RegisterRequest(node_key.public_key.hex, grant or self.grant(node_key),
                                  Capabilities(models, max_batch, "cpu"))
        challenge = self.c.begin_registration(request, self.now)
        signature = node_key.sign(bytes.fromhex(challenge.nonce)).hex()
        session = self.c.complete_registration(
            ChallengeResponse(node_key.keyid, signature), self.now)
        self.node_keys[session.node_id] = node_key
        self.sessions[session.node_id] = session.token
        assert session.state == NodeState.SYNCING
        assert self.c.authenticate_node(session.token, self.now) == session.node_id
        return session.node_id

    def beat(self, node_id: str, config_hash: str | None = None, status: str = "ready") -> Any:
        return self.c.heartbeat(node_id, Heartbeat(
            node_id, 1, config_hash or self.config_hash, "0.1", 0, 4, status), self.now)

    def admit(self, models: tuple[str, ...] = ("tiny",), max_batch: int = 4) -> str:
        node_id = self.register(generate_key(), models=models, max_batch=max_batch)
        assert self.beat(node_id).state == NodeState.READY
        return node_id

    def submit(self, account: str = "alice", model: str = "tiny", **kw: Any) -> str:
        kw.setdefault("prompt_tokens_estimate", 100)
        kw.setdefault("max_tokens", 50)
        job = self.c.submit_job(account, model, {"kind": "completion", "prompt": "hi"},
                                now=self.now, **kw)
        return job.job_id

    def tokens(self, job_id: str, node_id: str, count: int, start: int = 0) -> tuple[str, ...]:
        events = [JobEvent(job_id, start + i, "token", text="x", token_ids=(7,))
                  for i in range(count)]
        return self.c.post_events(node_id, events, self.now)

    def receipt(self, job_id: str, node_id: str, prompt: int, completion: int, *,
                key: SecretKey | None = None, request: dict[str, Any] | None = None,
                model: str = "tiny") -> dict[str, Any]:
        job = self.c.get_job(job_id)
        receipt = Receipt(job_id, node_id, model, canonical_digest(request or job.request),
                          "sha256:" + "0" * 64, prompt, completion, int(self.now))
        return sign_receipt(receipt, key or self.node_keys[node_id]).to_payload()

    def balance(self, account: str) -> int:
        return self.c.account_balance(account).balance

    def conserved(self) -> int:
        minted, balances, held = self.c.ledger_totals()
        assert minted == balances + held
        return minted


@pytest.fixture
def world(network_store: Store) -> World:
    return World(network_store)


# --- admission ------------------------------------------------------------------------------


def test_bad_grants_are_refused(world: World) -> None:
    node_key = generate_key()
    stranger = generate_key()
    cases = {
        "signed by a key that is not the account's": world.grant(node_key, account_key=stranger),
        "expired": world.grant(node_key, expires_in=-1),
        "for another node key": world.grant(generate_key()),
        "account without a key": world.grant(node_key, account="alice"),
        "unknown account": world.grant(node_key, account="nobody"),
    }
    for why, grant in cases.items():
        with pytest.raises(AdmissionError):
            world.register(node_key, grant)
        assert why
    tampered = world.grant(node_key)
    tampered["signed"]["account_id"] = "alice"
    with pytest.raises(AdmissionError):
        world.register(node_key, tampered)
    assert world.c.list_nodes() == []


def test_bad_challenges_are_refused(world: World) -> None:
    node_key = generate_key()
    request = RegisterRequest(node_key.public_key.hex, world.grant(node_key),
                              Capabilities(("tiny",), 4, "cpu"))
    challenge = world.c.begin_registration(request, world.now)
    wrong = generate_key().sign(bytes.fromhex(challenge.nonce)).hex()
    with pytest.raises(AdmissionError):
        world.c.complete_registration(ChallengeResponse(node_key.keyid, wrong), world.now)
    # The failed attempt used the challenge up: even the right signature needs a new one.
    right = node_key.sign(bytes.fromhex(challenge.nonce)).hex()
    with pytest.raises(AdmissionError):
        world.c.complete_registration(ChallengeResponse(node_key.keyid, right), world.now)
    # Expired challenge.
    challenge = world.c.begin_registration(request, world.now)
    right = node_key.sign(bytes.fromhex(challenge.nonce)).hex()
    late = world.now + world.settings.challenge_ttl_s + 1
    with pytest.raises(AdmissionError):
        world.c.complete_registration(ChallengeResponse(node_key.keyid, right), late)
    assert world.c.list_nodes() == []
    with pytest.raises(NodeAuthError):
        world.c.authenticate_node("rns-made-up", world.now)


def test_node_is_ready_only_with_the_current_config(world: World) -> None:
    node_id = world.register(generate_key())
    assert world.beat(node_id, config_hash="sha256:" + "9" * 64).state == NodeState.SYNCING
    assert world.beat(node_id).state == NodeState.READY
    new_hash = world.c.publish_config(_config_envelope(version=2), world.now)
    assert world.c.list_nodes()[0].state == NodeState.SYNCING
    reply = world.beat(node_id)  # still on the old config
    assert reply.state == NodeState.SYNCING
    assert reply.config_hash == new_hash
    assert world.c.snapshot(new_hash) is not None
    assert world.beat(node_id, config_hash=new_hash, status="syncing").state == (
        NodeState.SYNCING)  # has the config, not its models yet
    assert world.beat(node_id, config_hash=new_hash).state == NodeState.READY
    assert world.beat(node_id, config_hash=new_hash, status="syncing").state == (
        NodeState.SYNCING)
    assert world.beat(node_id, config_hash=new_hash).state == NodeState.READY
    assert world.beat(node_id, config_hash=new_hash, status="draining").state == (
        NodeState.DRAINING)
    with pytest.raises(Exception, match="does not supersede"):
        world.c.publish_config(_config_envelope(version=1), world.now)


def test_publish_checks_the_trust_root(network_store: Store) -> None:
    config_key = generate_key()
    root = make_root(version=1, expires_at=int(T0) + 86_400,
                     role_keys={r: [config_key.public_key] for r in
                                ("root", "config", "release", "network")})
    coordinator = Coordinator(network_store, CoordinatorSettings(trust_root=root))
    with pytest.raises(Exception, match="signature"):
        coordinator.publish_config(_config_envelope(key=generate_key()), T0)
    assert coordinator.current_config() is None
    digest = coordinator.publish_config(_config_envelope(key=config_key), T0)
    current = coordinator.current_config()
    assert current is not None
    assert current[0] == digest


# --- submission and routing -----------------------------------------------------------------


def test_submit_refusals_reserve_nothing(world: World) -> None:
    with pytest.raises(NoCapacityError):
        world.submit()  # no node at all
    world.admit(models=("other",))
    with pytest.raises(NoCapacityError):
        world.submit()  # no node has tiny
    with pytest.raises(ModelNotFoundError):
        world.submit(model="not-approved")
    world.admit()
    with pytest.raises(InsufficientQuotaError) as info:
        world.submit(max_tokens=10_000_000)
    assert info.value.status == 402
    assert world.balance("alice") == 1_000_000
    assert world.c.account_balance("alice").reserved == 0
    world.conserved()


def test_reservation_is_the_worst_case_rounded_up(world: World) -> None:
    world.admit()
    job_id = world.submit(prompt_tokens_estimate=3, max_tokens=4)
    job = world.c.get_job(job_id)
    # (3 * 100 + 4 * 200) / 1000 = 1.1 -> 2 micro-credits.
    assert job.reserved == job_cost(PRICE, 3, 4) == 2
    assert world.balance("alice") == 1_000_000 - 2
    assert world.c.account_balance("alice").reserved == 2
    explicit = world.c.get_job(world.submit(reserve=777))
    assert explicit.reserved == 777


def test_routing_picks_least_loaded_node_with_model_and_capacity(world: World) -> None:
    other = world.admit(models=("other",))
    small = world.admit(max_batch=1)
    big = world.admit(max_batch=3)
    jobs = [world.submit() for _ in range(5)]
    assigned = [world.c.get_job(j).node_id for j in jobs]
    assert other not in assigned
    assert assigned.count(small) == 1
    assert assigned.count(big) == 3
    assert assigned[4] is None  # both full: the fifth waits in the queue
    assert world.c.get_job(jobs[4]).state == JobState.QUEUED
    batch = world.c.lease(small, 8, world.now)
    assert [lease.job_id for lease in batch.leases] == [jobs[assigned.index(small)]]
    assert batch.leases[0].request == {"kind": "completion", "prompt": "hi"}
    assert world.c.lease(other, 8, world.now).leases == ()
    # Finishing the small node's job frees a slot: the queued job goes there.
    job_id = batch.leases[0].job_id
    world.c.post_events(small, [JobEvent(job_id, 0, "done", finish_reason="stop",
                                         usage=JobUsage(5, 0))], world.now)
    assert [x.job_id for x in world.c.lease(small, 8, world.now).leases] == [jobs[4]]


def test_an_event_that_ends_a_job_routes_the_queue_at_once(world: World) -> None:
    # Regression: the queued job waited for the next submit, lease or tick (up to 0.5 s)
    # while the node's long poll was already waiting for it.
    node = world.admit(max_batch=1)
    first, queued = world.submit(), world.submit()
    [lease] = world.c.lease(node, 1, world.now).leases
    assert lease.job_id == first
    assert world.c.get_job(queued).node_id is None
    world.c.take_wakeups()
    world.tokens(first, node, 2)  # tokens free nothing: the queue stays
    assert world.c.get_job(queued).node_id is None
    world.c.post_events(node, [JobEvent(first, 2, "done", finish_reason="stop",
                                        usage=JobUsage(5, 2))], world.now)
    assert world.c.get_job(queued).node_id == node  # without a lease, submit or tick
    nodes, _ = world.c.take_wakeups()
    assert node in nodes  # the node's waiting long poll is woken


def test_max_concurrent_jobs_of_the_config_caps_a_node(network_store: Store) -> None:
    world = World(network_store)
    world.c.publish_config(_config_envelope(version=2, max_concurrent=1), world.now)
    world.config_hash = world.c.current_config()[0]  # type: ignore[index]
    node = world.admit(max_batch=8)
    first, second = world.submit(), world.submit()
    assert world.c.get_job(first).node_id == node
    assert world.c.get_job(second).node_id is None


# --- a job's life and its money -------------------------------------------------------------


def test_full_job_settles_from_the_receipt(world: World) -> None:
    node = world.admit()
    minted = world.conserved()
    job_id = world.submit(prompt_tokens_estimate=100, max_tokens=50)
    [lease] = world.c.lease(node, 1, world.now).leases
    assert lease.job_id == job_id
    world.now += 0.25
    assert world.tokens(job_id, node, 3) == ()
    job = world.c.get_job(job_id)
    assert job.state == JobState.STREAMING
    assert job.first_token_at == world.now
    world.c.post_events(node, [JobEvent(job_id, 3, "done", finish_reason="length",
                                        usage=JobUsage(10, 3))], world.now)
    view = world.c.job_events(job_id, 0, account_id="alice")
    assert view.finished
    assert [e.kind for e in view.events] == ["token"] * 3 + ["done"]
    assert [e.seq for e in view.events] == [0, 1, 2, 3]
    assert world.c.get_job(job_id).state == JobState.DONE
    outcome = world.c.submit_receipt(node, world.receipt(job_id, node, 10, 3), world.now)
    charge = job_cost(PRICE, 10, 3)  # (1000 + 600) / 1000 -> 2
    assert outcome.charge == charge == 2
    assert outcome.payee_account == "bob"
    assert outcome.payee_amount == charge * 8_000 // 10_000
    assert outcome.platform_amount == charge - outcome.payee_amount
    assert world.balance("alice") == 1_000_000 - charge
    assert world.balance("bob") == outcome.payee_amount
    assert world.balance(PLATFORM_ACCOUNT) == outcome.platform_amount
    assert world.c.account_balance("alice").reserved == 0
    assert world.conserved() == minted
    # The same receipt again: accepted, nothing moves.
    again = world.c.submit_receipt(node, world.receipt(job_id, node, 10, 3), world.now)
    assert again.duplicate
    assert again.charge == charge
    assert world.balance("alice") == 1_000_000 - charge
    # Another receipt for the same job: refused.
    with pytest.raises(ReceiptConflictError):
        world.c.submit_receipt(node, world.receipt(job_id, node, 10, 1), world.now)
    assert world.conserved() == minted


def test_bad_receipts_are_refused(world: World) -> None:
    first, second = world.admit(), world.admit()
    job_id = world.submit()
    node = world.c.get_job(job_id).node_id
    assert node is not None
    other_node = second if node == first else first
    world.c.lease(node, 1, world.now)
    world.tokens(job_id, node, 1)
    bad = [
        (node, world.receipt(job_id, node, 1, 1, key=generate_key())),  # not the node's key
        (other_node, world.receipt(job_id, other_node, 1, 1)),  # job not leased to it
        (node, world.receipt(job_id, node, 1, 1, request={"other": 1})),  # wrong request hash
        (node, world.receipt(job_id, node, 1, 1, model="other")),  # wrong model
    ]
    forged = world.receipt(job_id, node, 1, 1)
    forged["signed"]["completion_tokens"] = 40  # tampered after signing
    bad.append((node, forged))
    for node_id, receipt in bad:
        with pytest.raises(ReceiptError):
            world.c.submit_receipt(node_id, receipt, world.now)
    with pytest.raises(ReceiptError):
        world.c.submit_receipt(node, {"signed": "nope"}, world.now)
    assert world.c.get_job(job_id).state == JobState.STREAMING
    assert not world.c.get_job(job_id).settled
    assert world.balance("bob") == 0


def test_receipt_before_done_finishes_the_job(world: World) -> None:
    node = world.admit()
    job_id = world.submit()
    world.c.lease(node, 1, world.now)
    world.tokens(job_id, node, 2)
    world.c.submit_receipt(node, world.receipt(job_id, node, 4, 2), world.now)
    view = world.c.job_events(job_id, 2)
    assert view.finished
    assert [e.kind for e in view.events] == ["done"]
    assert world.c.get_job(job_id).state == JobState.DONE


def test_dead_node_before_first_token_requeues_on_another_node(world: World) -> None:
    first = world.admit()
    job_id = world.submit()
    assert [x.job_id for x in world.c.lease(first, 1, world.now).leases] == [job_id]
    second = world.admit()
    world.now += 5
    world.beat(second)
    world.now += world.settings.heartbeat_timeout_s - 1  # first: silent past the timeout
    world.c.tick(world.now)
    nodes = {n.node_id: n.state for n in world.c.list_nodes()}
    assert nodes == {first: NodeState.DEAD, second: NodeState.READY}
    job = world.c.get_job(job_id)
    assert job.state == JobState.QUEUED
    assert job.node_id == second
    [lease] = world.c.lease(second, 1, world.now).leases
    assert lease.job_id == job_id
    assert world.c.get_job(job_id).attempts == 2
    # The dead node's session, late events and receipt are refused.
    with pytest.raises(NodeAuthError):
        world.c.authenticate_node(world.sessions[first], world.now)
    assert world.c.authenticate_node(world.sessions[second], world.now) == second
    with pytest.raises(NodeAuthError):
        world.tokens(job_id, first, 1)
    with pytest.raises(ReceiptError):
        world.c.submit_receipt(first, world.receipt(job_id, first, 1, 1), world.now)
    world.tokens(job_id, second, 2)
    outcome = world.c.submit_receipt(second, world.receipt(job_id, second, 5, 2), world.now)
    assert outcome.charge == job_cost(PRICE, 5, 2)
    assert world.c.job_events(job_id).events[0].seq == 0
    world.conserved()


def test_draining_node_gives_back_its_queued_jobs(world: World) -> None:
    first = world.admit(max_batch=1)
    world.submit()
    waiting = world.submit()
    assert world.c.get_job(waiting).node_id is None
    second = world.admit(max_batch=1)
    assert world.c.get_job(waiting).node_id == second
    assert world.beat(second, status="draining").state == NodeState.DRAINING
    assert world.c.get_job(waiting).node_id is None
    assert world.c.lease(second, 1, world.now).leases == ()
    assert world.beat(second).state == NodeState.READY
    assert world.c.get_job(waiting).node_id == second
    assert first != second


def test_leases_that_never_reached_the_node_go_back_uncounted(world: World) -> None:
    node = world.admit()
    job_id = world.submit()
    world.c.lease(node, 1, world.now)
    world.c.return_leases(node, [job_id, "job-unknown"], world.now)
    job = world.c.get_job(job_id)
    assert (job.state, job.attempts, job.node_id) == (JobState.QUEUED, 0, node)
    [lease] = world.c.lease(node, 1, world.now).leases
    assert lease.job_id == job_id
    assert world.c.get_job(job_id).attempts == 1


def test_a_submitted_job_is_leased_to_a_parked_poll_in_the_submit(world: World) -> None:
    node = world.admit(max_batch=4)
    parked = world.c.park_lease(node, 1)  # a long poll that found nothing, max_jobs 1
    first, second = world.submit(), world.submit()
    job = world.c.get_job(first)
    assert (job.state, job.attempts, job.node_id) == (JobState.LEASED, 1, node)
    assert job.deadline is not None
    # max_jobs reached: the second job stays queued for the node's next lease.
    assert (world.c.get_job(second).state, world.c.get_job(second).node_id) == (
        JobState.QUEUED, node)
    nodes, _ = world.c.take_wakeups()
    assert node in nodes  # the poll is woken
    handed = world.c.unpark_lease(parked)
    assert [x.job_id for x in handed.leases] == [first]
    assert handed.leases[0].request == {"kind": "completion", "prompt": "hi"}
    assert world.c.unpark_lease(parked).leases == ()  # handed once
    third = world.submit()  # unparked: queued, leased by the next poll
    assert world.c.get_job(third).state == JobState.QUEUED
    assert sorted(x.job_id for x in world.c.lease(node, 8, world.now).leases) == sorted(
        [second, third])


def test_a_submit_with_nothing_queued_ahead_writes_its_job_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Routed (and leased to a parked poll) before the insert: one job write, no re-read.
    node = world.admit(max_batch=2)
    parked = world.c.park_lease(node, 1)
    store = world.c._store
    calls: list[str] = []
    for name in ("insert_job", "update_job", "get_job"):
        original = getattr(store, name)

        def spy(*args: Any, _name: str = name, _orig: Any = original) -> Any:
            calls.append(_name)
            return _orig(*args)
        monkeypatch.setattr(store, name, spy)
    leased, routed = world.submit(), world.submit()  # handed to the poll / routed only
    assert calls == ["insert_job", "insert_job"]
    monkeypatch.undo()
    job = world.c.get_job(leased)
    assert (job.state, job.attempts, job.node_id) == (JobState.LEASED, 1, node)
    assert (world.c.get_job(routed).state, world.c.get_job(routed).node_id) == (
        JobState.QUEUED, node)
    assert [x.job_id for x in world.c.unpark_lease(parked).leases] == [leased]
    # The node is full now: the next job waits unassigned, and a job submitted behind it
    # does not overtake it when a slot frees.
    waiting = world.submit()
    world.now += 1  # oldest first (equal times leave the order open)
    behind = world.submit()
    assert world.c.get_job(waiting).node_id is None
    world.c.post_events(node, [JobEvent(leased, 0, "done", finish_reason="stop",
                                        usage=JobUsage(5, 0))], world.now)
    assert world.c.get_job(waiting).node_id == node
    assert world.c.get_job(behind).node_id is None


def test_leases_handed_to_a_poll_that_went_away_go_back(world: World) -> None:
    node = world.admit()
    parked = world.c.park_lease(node, 4)
    job_id = world.submit()
    [lease] = world.c.unpark_lease(parked).leases
    assert world.c.get_job(job_id).state == JobState.LEASED
    world.c.return_leases(node, [lease.job_id], world.now)
    job = world.c.get_job(job_id)
    assert (job.state, job.attempts) == (JobState.QUEUED, 0)
    assert [x.job_id for x in world.c.lease(node, 4, world.now).leases] == [job_id]


def test_requeue_stops_after_max_attempts(network_store: Store) -> None:
    world = World(network_store, max_attempts=1)
    node = world.admit()
    job_id = world.submit()
    world.c.lease(node, 1, world.now)
    world.now += world.settings.heartbeat_timeout_s + 1
    world.c.tick(world.now)
    job = world.c.get_job(job_id)
    assert job.state == JobState.FAILED
    assert job.charge == 0
    assert world.balance("alice") == 1_000_000
    assert world.c.job_events(job_id).events[-1].kind == "error"


def test_mid_stream_failure_is_charged_only_for_streamed_tokens(world: World) -> None:
    node = world.admit()
    job_id = world.submit(prompt_tokens_estimate=1000, max_tokens=1000)
    world.c.lease(node, 1, world.now)
    world.tokens(job_id, node, 7)
    world.now += world.settings.heartbeat_timeout_s + 1
    world.c.tick(world.now)
    job = world.c.get_job(job_id)
    assert job.state == JobState.FAILED
    assert job.error is not None
    assert "mid-stream after 7 token(s)" in job.error
    charge = job_cost(PRICE, 0, 7)  # 7 * 200 / 1000 -> 2
    assert job.charge == charge == 2
    assert world.balance("alice") == 1_000_000 - charge
    assert world.balance("bob") == charge * 8_000 // 10_000
    view = world.c.job_events(job_id, 7)
    assert view.finished
    assert view.error_code == "node_failed"
    assert [e.kind for e in view.events] == ["error"]
    assert "mid-stream" in (view.events[0].error or "")
    world.conserved()


def test_node_reported_error_fails_the_job(world: World) -> None:
    node = world.admit()
    job_id = world.submit()
    world.c.lease(node, 1, world.now)
    world.c.post_events(node, [JobEvent(job_id, 0, "error", error="out of memory")], world.now)
    job = world.c.get_job(job_id)
    assert job.state == JobState.FAILED
    assert job.charge == 0
    assert "out of memory" in (job.error or "")
    assert world.balance("alice") == 1_000_000


def test_event_sequence_duplicates_and_gaps(world: World) -> None:
    node = world.admit()
    job_id = world.submit()
    world.c.lease(node, 1, world.now)
    world.tokens(job_id, node, 2)
    world.tokens(job_id, node, 2)  # a retried post: duplicates dropped
    assert len(world.c.job_events(job_id).events) == 2
    with pytest.raises(JobStateError):
        world.tokens(job_id, node, 1, start=5)
    with pytest.raises(UnknownJobError):
        world.tokens("job-unknown", node, 1)
    queued = world.submit()
    other = world.admit()
    with pytest.raises(JobStateError):
        world.tokens(queued, other if world.c.get_job(queued).node_id != other else node, 1)


def test_cancel_running_job_tells_the_node_and_charges_streamed_tokens(world: World) -> None:
    node = world.admit()
    job_id = world.submit()
    world.c.lease(node, 1, world.now)
    world.tokens(job_id, node, 4)
    job = world.c.cancel_job(job_id, world.now, account_id="alice")
    assert job.state == JobState.CANCELLED
    assert job.charge == job_cost(PRICE, 0, 4)
    assert world.c.cancel_job(job_id, world.now).charge == job.charge  # idempotent
    assert world.tokens(job_id, node, 1, start=4) == (job_id,)  # told on its next post
    assert world.beat(node).cancel == ()
    view = world.c.job_events(job_id)
    assert view.events[-1].kind == "error"
    assert "cancelled" in (view.events[-1].error or "")
    # A receipt after the cancellation is kept but moves nothing.
    before = world.balance("alice")
    outcome = world.c.submit_receipt(node, world.receipt(job_id, node, 3, 5), world.now)
    assert outcome.charge is None
    assert world.balance("alice") == before
    world.conserved()


def test_cancel_is_delivered_by_heartbeat_and_queued_cancel_releases(world: World) -> None:
    node = world.admit(max_batch=1)
    running = world.submit()
    queued = world.submit()
    world.c.lease(node, 1, world.now)
    world.c.cancel_job(running, world.now)
    assert world.beat(node).cancel == (running,)
    assert world.beat(node).cancel == ()
    job = world.c.cancel_job(queued, world.now)
    assert job.charge == 0
    assert world.balance("alice") == 1_000_000
    assert world.c.account_balance("alice").reserved == 0


def test_accounts_cannot_touch_each_others_jobs_or_credits(world: World) -> None:
    world.admit()
    world.c.create_account(world.now, account_id="carol")
    job_id = world.submit()
    with pytest.raises(InsufficientQuotaError):
        world.submit(account="carol")
    with pytest.raises(UnknownJobError):
        world.c.cancel_job(job_id, world.now, account_id="carol")
    with pytest.raises(UnknownJobError):
        world.c.job_events(job_id, account_id="carol")
    with pytest.raises(UnknownJobError):
        world.c.get_job(job_id, account_id="carol")
    assert world.c.get_job(job_id).state == JobState.QUEUED
    assert world.balance("carol") == 0
    assert world.c.authenticate(world.alice_key) == "alice"


def test_api_keys_authenticate_their_account_only(world: World) -> None:
    from resultity_core import InvalidAPIKeyError

    second = world.c.create_api_key("alice", world.now)
    assert second != world.alice_key
    assert world.c.authenticate(second) == "alice"
    for key in ("", "rk-wrong", world.alice_key + "x", "Bearer " + world.alice_key):
        with pytest.raises(InvalidAPIKeyError):
            world.c.authenticate(key)


def test_timeouts_queue_deadline_and_late_receipt(network_store: Store) -> None:
    world = World(network_store, queue_timeout_s=30, receipt_timeout_s=20)
    node = world.admit(max_batch=1)
    done = world.submit()
    waiting = world.submit()
    world.c.lease(node, 1, world.now)
    world.tokens(done, node, 2)
    world.c.post_events(node, [JobEvent(done, 2, "done", finish_reason="stop",
                                        usage=JobUsage(10, 2))], world.now)
    world.now += 10
    world.beat(node)
    world.c.tick(world.now)
    assert not world.c.get_job(done).settled
    world.now += 11
    world.beat(node)
    world.c.tick(world.now)
    job = world.c.get_job(done)
    assert job.settled
    assert job.charge == job_cost(PRICE, 10, 2)  # settled on the streamed usage
    # The waiting job was assigned when the slot freed; it times out only if never leased.
    assert world.c.get_job(waiting).node_id == node
    world.now += 30
    world.beat(node)
    world.c.tick(world.now)
    failed = world.c.get_job(waiting)
    assert failed.state == JobState.FAILED
    assert failed.charge == 0
    world.conserved()


def test_steady_heartbeats_keep_a_node_alive_with_few_writes(world: World) -> None:
    node = world.admit()
    written = world.c.list_nodes()[0].last_heartbeat
    world.now += 1
    world.beat(node)  # nothing changed: the beat is remembered, not written
    assert world.c.list_nodes()[0].last_heartbeat == written
    for _ in range(40):  # 40 s of beats, past the 15 s heartbeat timeout
        world.now += 1
        world.beat(node)
        world.c.tick(world.now)
    [record] = world.c.list_nodes()
    assert record.state == NodeState.READY
    assert written < record.last_heartbeat <= world.now  # written now and then
    world.now += world.settings.heartbeat_timeout_s + 1
    world.c.tick(world.now)
    assert world.c.list_nodes()[0].state == NodeState.DEAD


def test_expired_grant_ends_the_node_at_its_next_heartbeat(world: World) -> None:
    node_key = generate_key()
    node = world.register(node_key, world.grant(node_key, expires_in=100))
    world.beat(node)
    job_id = world.submit()
    world.c.lease(node, 1, world.now)
    world.now += 95  # within the grant, and the node keeps beating
    world.beat(node)
    world.now += 10
    with pytest.raises(NodeAuthError, match="grant"):
        world.beat(node)
    assert world.c.list_nodes()[0].state == NodeState.DEAD
    with pytest.raises(NodeAuthError):
        world.c.authenticate_node(world.sessions[node], world.now)
    assert world.c.get_job(job_id).state == JobState.QUEUED
    world.register(node_key)  # a fresh grant admits it again
    assert world.beat(node).state == NodeState.READY


def test_reregistering_live_node_requeues_its_unstarted_jobs(world: World) -> None:
    node = world.admit()
    job_id = world.submit()
    world.c.lease(node, 1, world.now)
    old_session = world.sessions[node]
    world.register(world.node_keys[node])  # the Agent restarted
    with pytest.raises(NodeAuthError):
        world.c.authenticate_node(old_session, world.now)
    job = world.c.get_job(job_id)
    assert job.state == JobState.QUEUED
    assert job.node_id is None
    world.beat(node)
    assert world.c.get_job(job_id).node_id == node


def test_sqlite_restart_keeps_accounts_credits_jobs_and_receipts(tmp_path: Path) -> None:
    path = tmp_path / "net.db"
    world = World(SQLiteStore(path))
    node = world.admit()
    settled = world.submit()
    running = world.submit()
    world.c.lease(node, 2, world.now)
    world.tokens(settled, node, 1)
    world.c.submit_receipt(node, world.receipt(settled, node, 3, 1), world.now)
    world.tokens(running, node, 1)
    minted = world.conserved()
    alice = world.balance("alice")
    world.c.store.close()

    restarted = Coordinator(SQLiteStore(path), world.settings)
    assert restarted.current_config() is not None
    assert restarted.authenticate(world.alice_key) == "alice"
    assert restarted.account_balance("alice").balance == alice
    assert restarted.get_job(settled).settled
    # The job that was running when the Network stopped streams on from where it was...
    world.c = restarted
    world.tokens(running, node, 2, start=1)
    assert [e.seq for e in restarted.job_events(running).events] == [0, 1]
    # ...and its receipt still settles it.
    restarted.submit_receipt(node, world.receipt(running, node, 3, 3), world.now)
    assert restarted.get_job(running).state == JobState.DONE
    assert world.conserved() == minted
    assert restarted.account_balance("alice").reserved == 0
    duplicate = restarted.submit_receipt(node, world.receipt(settled, node, 3, 1), world.now)
    assert duplicate.duplicate
    restarted.store.close()


# --- conservation under arbitrary interleavings ---------------------------------------------

class MoneyMachine(RuleBasedStateMachine):
    """Arbitrary interleavings of submissions, leases, streams, receipts, cancellations,
    credits and time: credits are conserved at every step and everything settles."""

    def __init__(self) -> None:
        super().__init__()
        self.world = World(MemoryStore(), heartbeat_timeout_s=30, queue_timeout_s=50,
                           receipt_timeout_s=20)
        self.world.c.create_account(self.world.now, account_id="carol", initial_credits=2_000)
        self.nodes = [self.world.admit(max_batch=2), self.world.admit(max_batch=2)]
        self.jobs: list[str] = []
        self.leased: list[str] = []
        self.seqs: dict[str, int] = {}
        self.minted = self.world.conserved()
        self.receipts_settled = 0

    def _target(self, index: int) -> tuple[str, str | None]:
        job_id = self.leased[index % len(self.leased)]
        return job_id, self.world.c.get_job(job_id).node_id

    @rule(account=st.sampled_from(["alice", "carol"]), max_tokens=st.integers(0, 5_000))
    def submit(self, account: str, max_tokens: int) -> None:
        with contextlib.suppress(ResultityError):
            self.jobs.append(self.world.submit(account=account, max_tokens=max_tokens))

    @precondition(lambda self: self.jobs)
    @rule(first=st.integers(0, 1), count=st.integers(1, 3))
    def lease(self, first: int, count: int) -> None:
        for index in (first, 1 - first):
            with contextlib.suppress(ResultityError):
                for lease in self.world.c.lease(self.nodes[index], count, self.world.now).leases:
                    self.seqs[lease.job_id] = 0
                    self.leased.append(lease.job_id)

    @precondition(lambda self: self.leased)
    @rule(index=st.integers(0, 99), count=st.integers(1, 20))
    def tokens(self, index: int, count: int) -> None:
        job_id, node = self._target(index)
        seq = self.seqs.get(job_id, 0)
        if node is not None:
            with contextlib.suppress(ResultityError):
                self.world.tokens(job_id, node, count, start=seq)
                self.seqs[job_id] = seq + count

    @precondition(lambda self: self.leased)
    @rule(index=st.integers(0, 99), prompt=st.integers(0, 50))
    def done(self, index: int, prompt: int) -> None:
        job_id, node = self._target(index)
        seq = self.seqs.get(job_id, 0)
        if node is not None:
            with contextlib.suppress(ResultityError):
                self.world.c.post_events(node, [JobEvent(
                    job_id, seq, "done", finish_reason="stop", usage=JobUsage(prompt, seq),
                )], self.world.now)

    @precondition(lambda self: self.leased)
    @rule(index=st.integers(0, 99), prompt=st.integers(0, 5_000))
    def receipt(self, index: int, prompt: int) -> None:
        job_id, node = self._target(index)
        if node is not None:
            with contextlib.suppress(ResultityError):
                receipt = self.world.receipt(job_id, node, prompt, self.seqs.get(job_id, 0))
                outcome = self.world.c.submit_receipt(node, receipt, self.world.now)
                self.receipts_settled += outcome.charge is not None and not outcome.duplicate

    @precondition(lambda self: self.jobs)
    @rule(index=st.integers(0, 99))
    def cancel(self, index: int) -> None:
        self.world.c.cancel_job(self.jobs[index % len(self.jobs)], self.world.now)

    @rule(node=st.integers(0, 1), seconds=st.integers(1, 40))
    def wait(self, node: int, seconds: int) -> None:
        self.world.now += seconds
        with contextlib.suppress(ResultityError):
            self.world.beat(self.nodes[node])
        self.world.c.tick(self.world.now)

    @rule(amount=st.integers(0, 10_000))
    def credit(self, amount: int) -> None:
        self.world.c.credit_account("carol", amount, self.world.now)
        self.minted += amount

    @invariant()
    def conserved(self) -> None:
        assert self.world.conserved() == self.minted
        for account in self.world.c.list_accounts():
            assert account.balance >= 0

    def teardown(self) -> None:
        self.world.now += 1_000
        self.world.c.tick(self.world.now)
        self.world.c.tick(self.world.now + 1_000)
        assert self.world.c.ledger_totals() == (self.minted, self.minted, 0)
        for job_id in self.jobs:
            assert self.world.c.get_job(job_id).settled


MoneyMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_credits_are_conserved_and_everything_settles = MoneyMachine.TestCase
