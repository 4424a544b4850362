"""The Cloud's HTTPNetworkClient against the real Network app (not a stand-in).

The Network runs on 127.0.0.1 with an in-memory store, a published config and one admitted
node; the test plays that node through the coordinator (lease, post events), so the path
openai client -> Cloud -> HTTP -> Network -> "node" -> back is the production one except for
the Agent and the Runtime.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import openai
import pytest

from resultity_core import (
    Capabilities,
    ChallengeResponse,
    Heartbeat,
    JobEvent,
    JobState,
    JobUsage,
    NodeGrant,
    NodeState,
    RegisterRequest,
    example_node_config,
    generate_key,
    sign_envelope,
    sign_grant,
)

network = pytest.importorskip("resultity_servers.network")
if not hasattr(network, "running_network"):  # the Network's HTTP app is not in this tree
    pytest.skip("resultity_servers.network has no HTTP app yet", allow_module_level=True)

from resultity_servers._http import HTTPClient  # noqa: E402
from resultity_servers.cloud import CloudSettings, running_cloud  # noqa: E402

pytestmark = pytest.mark.anyio

TOKEN = "cloud-service-token"


class Node:
    """One admitted node, driven through the coordinator: answers every job with words."""

    def __init__(self, app: Any, words: list[str], delay_s: float = 0.0) -> None:
        self.app = app
        self.c = app.coordinator
        self.words = words
        self.delay_s = delay_s
        now = time.time()
        self.config_hash = self.c.publish_config(
            sign_envelope(example_node_config(now=int(now)).to_payload(), [generate_key()]), now
        )
        owner = generate_key()
        self.c.create_account(now, account_id="owner", public_key=owner.public_key)
        key = generate_key()
        grant = sign_grant(
            NodeGrant("owner", key.public_key, int(now) - 10, int(now) + 3600), owner
        ).to_payload()
        challenge = self.c.begin_registration(
            RegisterRequest(key.public_key.hex, grant, Capabilities(("tiny",), 4, "cpu")), now
        )
        signature = key.sign(bytes.fromhex(challenge.nonce)).hex()
        self.node_id = self.c.complete_registration(
            ChallengeResponse(key.keyid, signature), now
        ).node_id
        self.seq = 0
        self.beat()
        self.served: list[str] = []

    def beat(self) -> None:
        self.seq += 1
        beat = Heartbeat(self.node_id, self.seq, self.config_hash, "0.1", 0, 4, "ready")
        assert self.c.heartbeat(self.node_id, beat, time.time()).state == NodeState.READY

    def post(self, *events: JobEvent) -> tuple[str, ...]:
        cancel = self.c.post_events(self.node_id, list(events), time.time())
        self.app.wake()
        return cancel

    async def run(self) -> None:
        while True:
            self.beat()
            batch = self.c.lease(self.node_id, 4, time.time())
            for lease in batch.leases:
                await self.serve(lease)
            await anyio.sleep(0.01)

    async def serve(self, lease: Any) -> None:
        self.served.append(lease.job_id)
        request = lease.request
        n = request.get("n", 1)
        limit = request.get("max_tokens") or request.get("max_completion_tokens") or 100
        seq = 0
        produced = 0
        for index in range(n):
            words = self.words[:limit]
            for word in words:
                if self.delay_s:
                    await anyio.sleep(self.delay_s)
                cancel = self.post(
                    JobEvent(lease.job_id, seq, "token", index=index, text=word, token_ids=(1,))
                )
                seq += 1
                produced += 1
                if lease.job_id in cancel:
                    return
            reason = "length" if len(self.words) > limit else "stop"
            usage = JobUsage(3, produced)
            self.post(
                JobEvent(lease.job_id, seq, "done", index=index, finish_reason=reason, usage=usage)
            )
            seq += 1


@asynccontextmanager
async def stack(words: list[str], delay_s: float = 0.0) -> AsyncIterator[tuple[str, str, Node]]:
    with anyio.fail_after(30):
        coordinator = network.Coordinator(network.MemoryStore())
        settings = network.NetworkSettings(port=0, service_token=TOKEN)
        async with network.running_network(settings, coordinator=coordinator) as (net, app):
            node = Node(app, words, delay_s)
            _, api_key = coordinator.create_account(time.time(), initial_credits=10**9)
            cloud_settings = CloudSettings(port=0, network_url=net.url, service_token=TOKEN)
            async with running_cloud(cloud_settings) as (cloud, _), anyio.create_task_group() as tg:
                tg.start_soon(node.run)
                yield cloud.url, api_key, node
                tg.cancel_scope.cancel()


async def test_openai_client_through_the_real_network() -> None:
    async with stack(["Hello", " world", "!"]) as (url, key, node):

        def run() -> None:
            with openai.OpenAI(
                base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=10
            ) as client:
                assert [m.id for m in client.models.list().data] == ["tiny"]
                out = client.chat.completions.create(
                    model="tiny",
                    messages=[{"role": "user", "content": "hi"}],
                    n=2,
                    temperature=0.5,
                )
                assert [c.message.content for c in out.choices] == ["Hello world!"] * 2
                assert out.usage is not None
                assert out.usage.completion_tokens == 6
                chunks = list(
                    client.chat.completions.create(
                        model="tiny",
                        messages=[{"role": "user", "content": "hi"}],
                        max_tokens=2,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                )
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                assert text == "Hello world"
                assert chunks[-1].usage is not None
                assert chunks[-1].usage.completion_tokens == 2
                with pytest.raises(openai.AuthenticationError):
                    client.with_options(api_key="rk-nope").models.list()
                with pytest.raises(openai.NotFoundError):
                    client.completions.create(model="missing", prompt="x")

        await anyio.to_thread.run_sync(run)
        assert len(node.served) == 2


async def test_disconnect_cancels_the_job_on_the_real_network() -> None:
    async with stack([f" w{i}" for i in range(50)], delay_s=0.05) as (url, key, node):
        body = {"model": "tiny", "prompt": "x", "stream": True}
        async with HTTPClient(url) as client:
            headers = {"authorization": f"Bearer {key}"}
            async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
                async for chunk in r.aiter_bytes():
                    if b"w1" in chunk:
                        break
        left = time.monotonic()
        with anyio.fail_after(1.0):
            while not node.served or node.c.get_job(node.served[0]).state != JobState.CANCELLED:
                await anyio.sleep(0.01)
        assert time.monotonic() - left < 1.0


async def test_finished_jobs_leave_the_network_connection_reusable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The Cloud stops reading a job's stream at its last done event; closing it then must
    # read the stream's end so the connection returns to the pool: a dropped one costs the
    # next job a TCP connect on its path to the first token.
    clients: list[Any] = []
    submit = network.NetworkApp.submit

    async def recording(self: Any, request: Any) -> Any:
        clients.append(request.client)
        return await submit(self, request)

    monkeypatch.setattr(network.NetworkApp, "submit", recording)
    async with stack(["Hello", " world"]) as (url, key, node):
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"authorization": f"Bearer {key}"}
        async with HTTPClient(url) as client:
            for stream in (True, False, True, True):
                response = await client.request("POST", "/v1/chat/completions", json={
                    **body, "stream": stream}, headers=headers)
                assert response.status == 200
                assert b"Hello" in response.body
        assert len(node.served) == 4
        assert len(clients) == 4
        assert len(set(clients)) == 1, clients
