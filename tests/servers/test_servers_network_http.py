"""The Network's HTTP app on 127.0.0.1: a scripted node and the Cloud's HTTPNetworkClient."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from resultity_core import (
    Capabilities,
    Heartbeat,
    JobEvent,
    JobUsage,
    LeaseRequest,
    NodeGrant,
    Receipt,
    ReceiptSubmit,
    RegisterRequest,
    SecretKey,
    canonical_digest,
    example_node_config,
    generate_key,
    sign_envelope,
    sign_grant,
    sign_receipt,
)
from resultity_servers._http import HTTPClient, HTTPServer
from resultity_servers.cloud import (
    Account,
    DoneEvent,
    ErrorEvent,
    HTTPNetworkClient,
    JobSubmission,
    TokenEvent,
)
from resultity_servers.network import (
    DB_FILE,
    AdminRequestError,
    Coordinator,
    CoordinatorSettings,
    MemoryStore,
    NetworkAdminClient,
    NetworkApp,
    NetworkSettings,
    decimalize,
    running_network,
    serve_network,
)

pytestmark = pytest.mark.anyio

SERVICE = "svc-token-for-tests"


class ScriptedNode:
    """A node Agent reduced to its HTTP conversation with the Network."""

    def __init__(self, http: HTTPClient, key: SecretKey) -> None:
        self.http = http
        self.key = key
        self.node_id = key.keyid
        self.token = ""

    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    async def admit(self, owner_key: SecretKey, config_hash: str) -> None:
        now = int(time.time())
        grant = sign_grant(NodeGrant("bob", self.key.public_key, now - 5, now + 3600), owner_key)
        request = RegisterRequest(self.key.public_key.hex, grant.to_payload(),
                                  Capabilities(("tiny",), 4, "cpu"))
        challenge = await self.http.post_json("/network/v1/nodes/register", request.to_payload())
        signature = self.key.sign(bytes.fromhex(challenge["nonce"])).hex()
        session = await self.http.post_json("/network/v1/nodes/challenge", {
            "_type": "challenge_response", "node_id": self.node_id, "signature": signature})
        self.token = session["token"]
        reply = await self.beat(config_hash)
        assert reply["state"] == "ready"

    async def beat(self, config_hash: str) -> Any:
        beat = Heartbeat(self.node_id, 1, config_hash, "0.1", 0, 4, "ready")
        return await self.http.post_json("/network/v1/nodes/heartbeat", beat.to_payload(),
                                         headers=self.auth())

    async def lease(self, wait_ms: int) -> list[dict[str, Any]]:
        body = await self.http.post_json(
            "/network/v1/nodes/lease", LeaseRequest(self.node_id, 4, wait_ms).to_payload(),
            headers=self.auth())
        return list(body["leases"])

    async def post(self, *events: JobEvent) -> list[str]:
        body = await self.http.post_json(
            "/network/v1/nodes/events", {"events": [e.to_payload() for e in events]},
            headers=self.auth())
        return list(body["cancel"])

    async def run(self, lease: dict[str, Any], words: list[str], *, receipt: bool = True
                  ) -> Any:
        job_id = lease["job_id"]
        for seq, word in enumerate(words):
            await self.post(JobEvent(job_id, seq, "token", text=word, token_ids=(seq,)))
        usage = JobUsage(5, len(words))
        await self.post(JobEvent(job_id, len(words), "done", finish_reason="stop", usage=usage))
        if not receipt:
            return None
        receipt = Receipt(job_id, self.node_id, lease["model"], canonical_digest(lease["request"]),
                          "sha256:" + "0" * 64, 5, len(words), int(time.time()))
        envelope = sign_receipt(receipt, self.key).to_payload()
        return await self.http.post_json("/network/v1/nodes/receipts",
                                         ReceiptSubmit(envelope).to_payload(),
                                         headers=self.auth())


class Deployment:
    def __init__(self, server: HTTPServer, app: NetworkApp, owner: SecretKey, alice: str,
                 config_hash: str) -> None:
        self.server, self.app, self.owner, self.alice_key = server, app, owner, alice
        self.config_hash = config_hash


@asynccontextmanager
async def deployment(*, tick_interval_s: float = 0.05, **settings: Any
                     ) -> AsyncIterator[Deployment]:
    coordinator = Coordinator(MemoryStore(), CoordinatorSettings(**settings))
    now = time.time()
    envelope = sign_envelope(example_node_config(now=int(now)).to_payload(), [generate_key()])
    config_hash = coordinator.publish_config(envelope, now)
    owner = generate_key()
    coordinator.create_account(now, account_id="bob", public_key=owner.public_key)
    _, alice = coordinator.create_account(now, account_id="alice", initial_credits=100_000)
    settings = NetworkSettings(port=0, service_token=SERVICE, tick_interval_s=tick_interval_s)
    async with running_network(settings, coordinator=coordinator) as (server, app):
        yield Deployment(server, app, owner, alice, config_hash)


@asynccontextmanager
async def node_and_cloud(
    d: Deployment, http: HTTPClient
) -> AsyncIterator[tuple[ScriptedNode, HTTPNetworkClient, Account]]:
    """An admitted scripted node and the Cloud's client authenticated with alice's key."""
    node = ScriptedNode(http, generate_key())
    await node.admit(d.owner, d.config_hash)
    cloud = HTTPNetworkClient(d.server.url, SERVICE)
    try:
        account = await cloud.authenticate(d.alice_key)
        assert account is not None
        yield node, cloud, account
    finally:
        await cloud.aclose()


async def test_cloud_to_node_round_trip_and_settlement() -> None:
    async with deployment() as d, HTTPClient(d.server.url) as http:
        node = ScriptedNode(http, generate_key())
        await node.admit(d.owner, d.config_hash)
        cloud = HTTPNetworkClient(d.server.url, SERVICE)
        try:
            account = await cloud.authenticate(d.alice_key)
            assert account == Account("alice", "alice")
            assert await cloud.authenticate("rk-not-a-key") is None
            [model] = await cloud.list_models()
            assert (model.id, model.nodes, model.max_model_len) == ("tiny", 1, 2048)
            status = await cloud.status()
            assert (status.nodes_live, status.nodes_ready) == (1, 1)
            request = {"model": "tiny", "prompt": ["Hi"], "temperature": 0.5}
            receipts: list[Any] = []

            async def node_side() -> None:
                [lease] = await node.lease(5_000)
                assert lease["request"]["temperature"] == "0.5"  # no floats on the wire
                receipts.append(await node.run(lease, ["Hel", "lo"]))

            async with anyio.create_task_group() as tg:
                tg.start_soon(node_side)
                await anyio.sleep(0.05)  # the node is waiting in its long poll
                handle = await cloud.submit(
                    account, JobSubmission("completion", "tiny", request, 500, 1))
                events = [e async for e in cloud.events(handle)]
            assert events == [TokenEvent(0, "Hel"), TokenEvent(0, "lo"),
                              DoneEvent(0, "stop", 5, 2)]
            [outcome] = receipts
            assert outcome["charge"] == 1  # (5 * 100 + 2 * 200) / 1000 rounded up
            service = {"authorization": f"Bearer {SERVICE}"}
            balance = await http.get_json("/network/v1/accounts/alice", headers=service)
            assert balance == {"account_id": "alice", "balance": 99_999, "reserved": 0}
            ledger = await http.get_json("/network/v1/accounts/alice/ledger", headers=service)
            kinds = [(e["kind"], e["amount"]) for e in ledger["data"]]
            assert kinds == [("credit", 100_000), ("reserve", -500), ("refund", 499)]
        finally:
            await cloud.aclose()


@asynccontextmanager
async def _parked_poll(node: ScriptedNode) -> AsyncIterator[list[dict[str, Any]]]:
    """Start a lease long poll of ``node`` and let it find nothing and wait; yield the list
    its leases go to (filled when the poll answers, at the end of the block at the latest)."""
    leases: list[dict[str, Any]] = []

    async def poll() -> None:
        leases.extend(await node.lease(5_000))

    async with anyio.create_task_group() as tg:
        tg.start_soon(poll)
        await anyio.sleep(0.1)  # the poll found nothing and waits
        yield leases


async def test_a_waiting_lease_poll_takes_a_submitted_job_without_a_lease_pass() -> None:
    async with deployment(tick_interval_s=60.0) as d, HTTPClient(d.server.url) as http:
        node = ScriptedNode(http, generate_key())
        await node.admit(d.owner, d.config_hash)
        coordinator = d.app.coordinator
        passes: list[str] = []
        real_lease = coordinator.lease

        def counted(node_id: str, max_jobs: int, now: float) -> Any:
            passes.append(node_id)
            return real_lease(node_id, max_jobs, now)

        coordinator.lease = counted  # type: ignore[method-assign]
        service = {"authorization": f"Bearer {SERVICE}"}
        async with _parked_poll(node) as leases:
            assert passes == [node.node_id]
            job = await http.post_json("/network/v1/jobs", {
                "account_id": "alice", "model": "tiny", "max_tokens": 4,
                "request": {"kind": "completion", "prompt": "hi"}}, headers=service)
            assert job["state"] == "leased"  # leased by the submit itself
        assert [x["job_id"] for x in leases] == [job["job_id"]]
        assert passes == [node.node_id]  # the woken poll made no second lease pass
        assert coordinator._parked == {}


async def test_a_streamed_submit_handed_to_a_waiting_poll_answers_before_any_event() -> None:
    # The head of such an answer waits a little for the first event (the node is starting
    # the job), but not for an event that does not come.
    async with deployment(tick_interval_s=60.0) as d, HTTPClient(d.server.url) as http:
        node = ScriptedNode(http, generate_key())
        await node.admit(d.owner, d.config_hash)
        service = {"authorization": f"Bearer {SERVICE}"}
        async with _parked_poll(node) as leases:
            job = {"account_id": "alice", "model": "tiny", "max_tokens": 4, "stream": True,
                   "request": {"kind": "completion", "prompt": "hi"}}
            with anyio.fail_after(1):
                async with http.stream("POST", "/network/v1/jobs", json=job,
                                       headers=service) as r:
                    assert r.status == 200
                    job_id = r.header("x-job-id")
                    assert job_id is not None
                    assert str(d.app.coordinator.get_job(job_id).state) == "leased"
                    await node.run(leases[0], ["Hel", "lo"], receipt=False)
                    got = [sse.data async for sse in r.aiter_sse()]
        assert [x["job_id"] for x in leases] == [job_id]
        assert [json.loads(x)["kind"] for x in got[:-1]] == ["token", "token", "done"]


async def test_finished_job_streams_leave_no_waiters_and_ends_route_the_queue() -> None:
    # Regressions: each job's event stream left its waiter in the app's map for good; an
    # event ending a job did not route the queue, so the node's waiting long poll got the
    # next job only at the next tick (30 s here).
    async with deployment(tick_interval_s=30, heartbeat_timeout_s=60) as d, \
            HTTPClient(d.server.url) as http:
        async with node_and_cloud(d, http) as (node, cloud, account):
            request = {"model": "tiny", "prompt": ["Hi"]}
            handles = [await cloud.submit(account, JobSubmission(
                "completion", "tiny", request, 500, 1)) for _ in range(6)]
            # the node takes 4 at once (its capabilities): two wait in the queue
            assert [d.app.coordinator.get_job(h.job_id).node_id is None
                    for h in handles].count(True) == 2
            leases = await node.lease(1_000)
            assert len(leases) == 4
            outputs: list[list[Any]] = []

            async def read(handle: Any) -> None:
                outputs.append([e async for e in cloud.events(handle)])

            rest: list[dict[str, Any]] = []

            async def poll() -> None:  # waits before the jobs end (re-polls every 20 s)
                while len(rest) < 2:
                    rest.extend(await node.lease(20_000))

            async with anyio.create_task_group() as tg:
                for handle in handles:
                    tg.start_soon(read, handle)
                tg.start_soon(poll)
                await anyio.sleep(0.05)
                with anyio.fail_after(5):  # well before the 30 s tick or a 20 s re-poll
                    for lease in leases[:2]:  # (a receipt would route the queue too)
                        await node.run(lease, ["a"], receipt=False)
                    while len(rest) < 2:
                        await anyio.sleep(0.01)
                    for lease in leases[2:] + rest:
                        await node.run(lease, ["b", "c"])
            assert len(outputs) == 6
            assert all(isinstance(events[-1], DoneEvent) for events in outputs)
            with anyio.fail_after(2):
                while d.app._job_waiters:
                    await anyio.sleep(0.01)


async def test_closing_the_event_stream_cancels_the_job_on_the_node() -> None:
    async with deployment() as d, HTTPClient(d.server.url) as http:
        async with node_and_cloud(d, http) as (node, cloud, account):
            handle = await cloud.submit(account, JobSubmission(
                "completion", "tiny", {"model": "tiny", "prompt": ["x"]}, 500, 1))
            [lease] = await node.lease(1_000)
            assert await node.post(JobEvent(handle.job_id, 0, "token", text="a",
                                            token_ids=(1,))) == []
            stream = cloud.events(handle)
            first = await anext(stream)
            assert first == TokenEvent(0, "a")
            await stream.aclose()  # the Cloud's client went away
            with anyio.fail_after(5):
                while True:
                    cancel = await node.post(JobEvent(handle.job_id, 1, "token", text="b",
                                                      token_ids=(2,)))
                    if cancel:
                        break
                    await anyio.sleep(0.02)
            assert cancel == [lease["job_id"]]
            job = d.app.coordinator.get_job(handle.job_id)
            assert str(job.state) == "cancelled"
            assert job.charge == 1  # one streamed token at 200 per 1k, rounded up


async def test_submit_answered_with_the_event_stream() -> None:
    async with deployment() as d, HTTPClient(d.server.url) as http:
        node = ScriptedNode(http, generate_key())
        await node.admit(d.owner, d.config_hash)
        service = {"authorization": f"Bearer {SERVICE}"}
        job = {"account_id": "alice", "model": "tiny", "max_tokens": 4, "stream": True,
               "request": {"kind": "completion", "prompt": "hi"}}
        # Refusals stay JSON errors with their status.
        for change, status in (({"reserve": 10**9}, 402), ({"stream": "yes"}, 400),
                               ({"model": "nope"}, 404)):
            r = await http.request("POST", "/network/v1/jobs", json={**job, **change},
                                   headers=service)
            assert r.status == status
            assert "error" in r.json()
        async with http.stream("POST", "/network/v1/jobs", json=job, headers=service) as r:
            assert r.status == 200
            assert (r.header("content-type") or "").startswith("text/event-stream")
            job_id = r.header("x-job-id")
            assert job_id is not None
            assert job_id.startswith("job-")
            [lease] = await node.lease(1_000)
            assert lease["job_id"] == job_id
            await node.run(lease, ["Hel", "lo"], receipt=False)
            got = [sse.data async for sse in r.aiter_sse()]
        assert [json.loads(x)["kind"] for x in got[:-1]] == ["token", "token", "done"]
        assert got[-1] == "[DONE]"
        assert str(d.app.coordinator.get_job(job_id).state) == "done"
        # Closing the stream before the job ends cancels it (here: still queued).
        async with http.stream("POST", "/network/v1/jobs", json=job, headers=service) as r:
            job_id = r.header("x-job-id")
            assert job_id is not None
        with anyio.fail_after(5):
            while str(d.app.coordinator.get_job(job_id).state) != "cancelled":
                await anyio.sleep(0.01)


async def test_cloud_client_closes_a_submitted_stream_it_never_read() -> None:
    async with deployment() as d:
        cloud = HTTPNetworkClient(d.server.url, SERVICE)
        try:
            async with HTTPClient(d.server.url) as http:
                node = ScriptedNode(http, generate_key())
                await node.admit(d.owner, d.config_hash)
            account = await cloud.authenticate(d.alice_key)
            assert account is not None
            submission = JobSubmission("completion", "tiny", {"prompt": ["x"]}, 500, 1)
            first, second, third = [await cloud.submit(account, submission) for _ in range(3)]
            assert set(cloud._open) == {first.job_id, second.job_id, third.job_id}
            await cloud.events(first).aclose()  # closed before its first event
            await cloud.cancel(second)
            assert set(cloud._open) == {third.job_id}
            with anyio.fail_after(5):
                while {str(d.app.coordinator.get_job(h.job_id).state)
                       for h in (first, second)} != {"cancelled"}:
                    await anyio.sleep(0.01)
        finally:
            await cloud.aclose()
        assert cloud._open == {}
        with anyio.fail_after(5):  # aclose closed the third job's stream: cancelled too
            while str(d.app.coordinator.get_job(third.job_id).state) != "cancelled":
                await anyio.sleep(0.01)


async def test_auth_and_refusals() -> None:
    async with deployment() as d, HTTPClient(d.server.url) as http:
        # Node routes need a session; Cloud routes need the service token.
        beat = Heartbeat("n", 1, None, "0.1", 0, 1, "ready").to_payload()
        response = await http.request("POST", "/network/v1/nodes/heartbeat", json=beat)
        assert response.status == 401
        response = await http.request("POST", "/network/v1/nodes/heartbeat", json=beat,
                                      headers={"authorization": "Bearer rns-forged"})
        assert response.status == 401
        for token in (None, "wrong"):
            headers = {"authorization": f"Bearer {token}"} if token else {}
            response = await http.request("GET", "/network/v1/status", headers=headers)
            assert response.status == 401
            assert response.json()["error"]["code"] == "invalid_service_token"
        # A grant signed by a key that is not the account's: 403.
        node_key = generate_key()
        now = int(time.time())
        grant = sign_grant(NodeGrant("bob", node_key.public_key, now, now + 60), generate_key())
        request = RegisterRequest(node_key.public_key.hex, grant.to_payload(),
                                  Capabilities(("tiny",), 1, "cpu"))
        response = await http.request("POST", "/network/v1/nodes/register",
                                       json=request.to_payload())
        assert response.status == 403
        assert response.json()["error"]["code"] == "admission_refused"
        # Malformed bodies: 400 with a message, never a 500.
        for body in (b"{", b'{"a": 1, "a": 2}', b"[]", b'{"_type": "register_request"}'):
            response = await http.request("POST", "/network/v1/nodes/register", content=body)
            assert response.status == 400, body
            assert response.json()["error"]["message"]
        # Submitting for an account without credits: the OpenAI 402.
        service = {"authorization": f"Bearer {SERVICE}"}
        created = await http.request("POST", "/network/v1/accounts", json={"account_id": "eve"},
                                     headers=service)
        assert created.status == 201
        assert created.json()["api_key"].startswith("rk-")
        node = ScriptedNode(http, generate_key())
        await node.admit(d.owner, d.config_hash)
        job = {"account_id": "eve", "model": "tiny", "request": {"prompt": "x"}, "reserve": 10}
        response = await http.request("POST", "/network/v1/jobs", json=job, headers=service)
        assert response.status == 402
        assert response.json()["error"]["code"] == "insufficient_quota"
        job["model"] = "nope"
        response = await http.request("POST", "/network/v1/jobs", json=job, headers=service)
        assert response.status == 404


async def test_config_pointer_snapshot_and_bounded_long_poll() -> None:
    async with deployment() as d, HTTPClient(d.server.url) as http:
        pointer = await http.get_json("/network/v1/config")
        assert pointer["config_hash"] == d.config_hash
        snapshot = await http.get_json(f"/network/v1/config/{d.config_hash}")
        assert canonical_digest(snapshot["signed"]) == d.config_hash
        assert await http.get_json(f"/network/v1/snapshots/{d.config_hash}") == snapshot
        missing = await http.request("GET", "/network/v1/config/sha256:" + "0" * 64)
        assert missing.status == 404
        node = ScriptedNode(http, generate_key())
        await node.admit(d.owner, d.config_hash)
        started = anyio.current_time()
        assert await node.lease(300) == []
        assert 0.25 < anyio.current_time() - started < 3


def test_decimalize_turns_floats_into_decimal_text() -> None:
    assert decimalize({"t": 0.7, "b": {"5": -1.5}, "n": 2, "s": ["x", 1e-7]}) == {
        "t": "0.7", "b": {"5": "-1.5"}, "n": 2, "s": ["x", "1e-07"]}
    with pytest.raises(ValueError, match="finite"):
        decimalize({"t": float("nan")})


async def test_events_before_an_error_and_unknown_job() -> None:
    async with deployment() as d, HTTPClient(d.server.url) as http:
        async with node_and_cloud(d, http) as (node, cloud, account):
            handle = await cloud.submit(account, JobSubmission(
                "completion", "tiny", {"model": "tiny", "prompt": ["x"]}, 500, 1))
            await node.lease(1_000)
            await node.post(JobEvent(handle.job_id, 0, "token", text="a", token_ids=(1,)),
                            JobEvent(handle.job_id, 1, "error", error="runtime crashed"))
            events = [e async for e in cloud.events(handle)]
            assert events[0] == TokenEvent(0, "a")
            assert isinstance(events[1], ErrorEvent)
            assert "runtime crashed" in events[1].error.message
            response = await http.request(
                "GET", "/network/v1/jobs/job-nope/events",
                headers={"authorization": f"Bearer {SERVICE}"})
            assert response.status == 404


async def test_serve_network_restart_keeps_accounts_and_credits(tmp_path: Path) -> None:
    settings = NetworkSettings(port=0, service_token=SERVICE, data_dir=str(tmp_path / "net"))
    service = {"authorization": f"Bearer {SERVICE}"}
    for restart in (False, True):
        async with anyio.create_task_group() as tg:
            port = await tg.start(functools.partial(serve_network, settings))
            async with HTTPClient(f"http://127.0.0.1:{port}") as http:
                health = await http.request("GET", "/network/v1/health")
                assert health.status == 503  # no config published yet
                if not restart:
                    created = await http.request("POST", "/network/v1/accounts", headers=service,
                                                 json={"account_id": "alice", "credits": 500})
                    key = created.json()["api_key"]
                    await http.post_json("/network/v1/accounts/alice/credit", {"amount": 25},
                                         headers=service)
                account = await http.get_json("/network/v1/accounts/alice", headers=service)
                assert account == {"account_id": "alice", "balance": 525, "reserved": 0}
                auth = await http.post_json("/network/v1/auth", {"api_key": key},
                                            headers=service)
                assert auth["account_id"] == "alice"
            tg.cancel_scope.cancel()
    assert (tmp_path / "net" / DB_FILE).exists()


def test_public_surface_imports_without_torch() -> None:
    import resultity_servers.network as network

    for name in network.__all__:
        assert hasattr(network, name), name
    code = ("import sys, resultity_servers.network; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_shutdown_ends_lease_long_polls_at_once() -> None:
    results: list[Any] = []
    started = 0.0
    async with deployment() as d, HTTPClient(d.server.url) as http:
        node = ScriptedNode(http, generate_key())
        await node.admit(d.owner, d.config_hash)

        async def poll() -> None:
            results.append(await node.lease(15_000))

        async with anyio.create_task_group() as tg:
            tg.start_soon(poll)
            await anyio.sleep(0.1)
            started = anyio.current_time()
            d.app.begin_shutdown()
    assert results == [[]]
    assert anyio.current_time() - started < 3


async def test_node_protocol_errors_over_http() -> None:
    async with deployment() as d, HTTPClient(d.server.url) as http:
        node = ScriptedNode(http, generate_key())
        await node.admit(d.owner, d.config_hash)
        other = ScriptedNode(http, generate_key())
        await other.admit(d.owner, d.config_hash)
        service = {"authorization": f"Bearer {SERVICE}"}
        submitted = await http.post_json("/network/v1/jobs", {
            "account_id": "alice", "model": "tiny", "request": {"prompt": "x"}, "reserve": 50,
        }, headers=service)
        job_id = submitted["job_id"]
        runner = node if submitted["node_id"] == node.node_id else other
        stranger = other if runner is node else node
        [lease] = await runner.lease(1_000)
        # Someone else's node id in a lease request: 401.
        response = await http.request(
            "POST", "/network/v1/nodes/lease",
            json=LeaseRequest(stranger.node_id, 1, 0).to_payload(), headers=runner.auth())
        assert response.status == 401
        # Events out of order: 409; for a job leased to another node: 409.
        gap = JobEvent(job_id, 3, "token", text="x", token_ids=(1,)).to_payload()
        response = await http.request("POST", "/network/v1/nodes/events",
                                      json={"events": [gap]}, headers=runner.auth())
        assert response.status == 409
        first = JobEvent(job_id, 0, "token", text="x", token_ids=(1,)).to_payload()
        response = await http.request("POST", "/network/v1/nodes/events",
                                      json={"events": [first]}, headers=stranger.auth())
        assert response.status == 409
        # A receipt signed by another key: 400; the right one settles.
        receipt = Receipt(job_id, runner.node_id, "tiny", canonical_digest(lease["request"]),
                          "sha256:" + "0" * 64, 1, 1, int(time.time()))
        forged = sign_receipt(receipt, stranger.key).to_payload()
        response = await http.request("POST", "/network/v1/nodes/receipts",
                                      json=ReceiptSubmit(forged).to_payload(),
                                      headers=runner.auth())
        assert response.status == 400
        assert response.json()["error"]["code"] == "receipt_refused"
        good = ReceiptSubmit(sign_receipt(receipt, runner.key).to_payload()).to_payload()
        outcome = await http.post_json("/network/v1/nodes/receipts", good, headers=runner.auth())
        assert outcome["charge"] == 1
        again = await http.post_json("/network/v1/nodes/receipts", good, headers=runner.auth())
        assert again["duplicate"] is True
        job = await http.get_json(f"/network/v1/jobs/{job_id}", headers=service)
        assert (job["state"], job["charge"], job["settled"]) == ("done", 1, True)


async def test_no_node_in_time_reaches_the_cloud_as_no_capacity() -> None:
    async with deployment(queue_timeout_s=0.3) as d, HTTPClient(d.server.url) as http:
        # the node is admitted but never leases
        async with node_and_cloud(d, http) as (_node, cloud, account):
            handle = await cloud.submit(account, JobSubmission(
                "completion", "tiny", {"model": "tiny", "prompt": ["x"]}, 500, 1))
            with anyio.fail_after(5):
                events = [e async for e in cloud.events(handle)]
            [event] = events
            assert isinstance(event, ErrorEvent)
            assert event.error.code == "no_capacity"
            assert "no node could take the job" in event.error.message
            balance = d.app.coordinator.account_balance("alice")
            assert (balance.balance, balance.reserved) == (100_000, 0)


async def test_admin_client_manages_accounts_and_config() -> None:
    async with deployment() as d:
        async with NetworkAdminClient(d.server.url, SERVICE) as admin:
            owner = generate_key()
            created = await admin.create_account("dave", public_key=owner.public_key,
                                                 credits=300)
            assert (created.account_id, created.balance) == ("dave", 300)
            assert created.public_key == owner.public_key.hex
            assert d.app.coordinator.authenticate(created.api_key) == "dave"
            assert (await admin.credit("dave", 50)).balance == 350
            assert (await admin.account("dave")).balance == 350
            second = await admin.create_api_key("dave")
            assert d.app.coordinator.authenticate(second) == "dave"
            ids = [a.account_id for a in await admin.list_accounts()]
            assert {"alice", "bob", "dave", "platform"} <= set(ids)
            await admin.set_public_key("dave", None)
            with pytest.raises(AdminRequestError) as info:
                await admin.create_account("dave")
            assert (info.value.status, info.value.code) == (409, "account_exists")
            with pytest.raises(AdminRequestError) as info:
                await admin.credit("nobody", 1)
            assert info.value.status == 404
            config = example_node_config(now=int(time.time()), version=2)
            digest = await admin.publish_config(sign_envelope(config.to_payload(),
                                                              [generate_key()]))
            current = d.app.coordinator.current_config()
            assert current is not None
            assert current[0] == digest != d.config_hash
        async with NetworkAdminClient(d.server.url, "wrong") as intruder:
            with pytest.raises(AdminRequestError) as info:
                await intruder.list_accounts()
            assert info.value.status == 401


async def test_a_stream_read_to_the_end_is_released_before_the_retention_window() -> None:
    # Memory under load: a finished job's events stay for event_retention_s (a reader may
    # reconnect), but once a reader has had [DONE] only delivered_retention_s.
    async with deployment(event_retention_s=60, delivered_retention_s=0.2) as d, \
            HTTPClient(d.server.url) as http:
        async with node_and_cloud(d, http) as (node, cloud, account):
            coordinator = d.app.coordinator
            read = await cloud.submit(account, JobSubmission(
                "completion", "tiny", {"model": "tiny", "prompt": ["Hi"]}, 500, 1))
            [lease] = await node.lease(1_000)
            await node.run(lease, ["a", "b"])
            events = [e async for e in cloud.events(read)]
            assert isinstance(events[-1], DoneEvent)
            # a job finished on the Network with nobody reading its stream keeps its events
            unread = coordinator.submit_job("alice", "tiny", {
                "kind": "completion", "prompt": "hi"}, now=time.time(), max_tokens=4)
            [lease] = await node.lease(1_000)
            await node.run(lease, ["c"])
            with anyio.fail_after(5):
                while read.job_id in coordinator._streams:
                    await anyio.sleep(0.02)
            assert unread.job_id in coordinator._streams
            view = coordinator.job_events(unread.job_id)
            assert view.finished
            assert [e.text for e in view.events if e.kind == "token"] == ["c"]
            # the released job's late reader learns that its output is gone, in one event
            late = coordinator.job_events(read.job_id)
            assert [e.kind for e in late.events] == ["error"]
            assert late.finished
