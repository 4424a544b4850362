"""The official openai client against a running demo (Network, Cloud, one real node)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from anyio.from_thread import BlockingPortal
from e2e_harness import balance, demo_in_thread, jobs_of, wait_until

from resultity_core import JobState
from resultity_servers.demo import DEMO_ACCOUNT, PRICE, Demo, DemoOptions
from resultity_servers.network import job_cost

pytestmark = pytest.mark.slow

Env = tuple[BlockingPortal, Demo]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    options = DemoOptions(data_dir=tmp_path_factory.mktemp("demo"), port=0, nodes=1,
                          preset="tiny", runtime_threads=1)
    with demo_in_thread(options) as env:
        yield env


@pytest.fixture
def client(env: Env) -> Iterator[openai.OpenAI]:
    _portal, demo = env
    with openai.OpenAI(base_url=demo.base_url, api_key=demo.api_key, max_retries=0,
                       timeout=60) as c:
        yield c


def _settled(portal: BlockingPortal, demo: Demo, account: str, count: int) -> list[Any]:
    def done() -> bool:
        jobs = jobs_of(portal, demo.coordinator, account)
        return len(jobs) >= count and all(j.settled for j in jobs)

    wait_until(done, 20, "jobs to settle")
    return jobs_of(portal, demo.coordinator, account)


def test_chat_non_stream_charges_exactly_the_usage(env: Env, client: openai.OpenAI) -> None:
    portal, demo = env
    before = balance(portal, demo.coordinator, DEMO_ACCOUNT)
    ids = [m.id for m in client.models.list()]
    assert ids == [demo.model]
    reply = client.chat.completions.create(
        model=demo.model, messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=12, temperature=0)
    assert reply.object == "chat.completion"
    choice = reply.choices[0]
    assert isinstance(choice.message.content, str)
    assert choice.message.content
    assert choice.finish_reason in {"stop", "length"}
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0
    assert 0 < reply.usage.completion_tokens <= 12
    jobs = _settled(portal, demo, DEMO_ACCOUNT, 1)
    job = jobs[-1]
    assert job.state == JobState.DONE
    assert (job.prompt_tokens, job.completion_tokens) == (
        reply.usage.prompt_tokens, reply.usage.completion_tokens)
    cost = job_cost(PRICE, job.prompt_tokens, job.completion_tokens)
    assert job.charge == cost
    after = balance(portal, demo.coordinator, DEMO_ACCOUNT)
    assert after == (before[0] - cost, 0)
    # the receipt the node signed is on record
    receipt = portal.call(_receipt, demo, job.job_id)
    assert receipt is not None
    assert receipt.completion_tokens == job.completion_tokens


def _receipt(demo: Demo, job_id: str) -> Any:
    with demo.coordinator.store.transaction() as tx:
        return tx.get_receipt(job_id)


def test_stream_with_usage_matches_the_non_stream_answer(client: openai.OpenAI,
                                                         env: Env) -> None:
    _portal, demo = env
    messages: Any = [{"role": "user", "content": "Tell me about nodes"}]
    plain = client.chat.completions.create(model=demo.model, messages=messages, max_tokens=16,
                                           temperature=0)
    stream = client.chat.completions.create(
        model=demo.model, messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == plain.choices[0].message.content
    assert usage is not None
    assert plain.usage is not None
    assert usage.completion_tokens == plain.usage.completion_tokens
    assert finish == plain.choices[0].finish_reason


def test_legacy_completions(client: openai.OpenAI, env: Env) -> None:
    _portal, demo = env
    reply = client.completions.create(model=demo.model, prompt="The network", max_tokens=5,
                                      temperature=0)
    assert reply.object == "text_completion"
    assert reply.usage is not None
    assert reply.usage.completion_tokens <= 5
    assert isinstance(reply.choices[0].text, str)


def test_errors_have_openai_statuses(client: openai.OpenAI, env: Env) -> None:
    _portal, demo = env
    with openai.OpenAI(base_url=demo.base_url, api_key="rk-not-a-key", max_retries=0) as bad, \
            pytest.raises(openai.AuthenticationError) as auth:
        bad.models.list()
    assert auth.value.status_code == 401
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404
    with pytest.raises(openai.BadRequestError) as invalid:
        client.chat.completions.create(model=demo.model, messages=[], max_tokens=2)
    assert invalid.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as param:
        client.chat.completions.create(model=demo.model, max_tokens=-3,
                                       messages=[{"role": "user", "content": "hi"}])
    assert param.value.body is not None
    assert "max_tokens" in json.dumps(param.value.body)


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b"connection: close" not in \
                    b"".join(chunks).lower():
                break
    return b"".join(chunks)


def test_malformed_http_and_invalid_json_get_400(env: Env, client: openai.OpenAI) -> None:
    _portal, demo = env
    port = int(demo.cloud_url.rsplit(":", 1)[1])
    answer = _raw(port, b"GARBAGE \x00\x01 nonsense\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    body = b'{"model": "tiny", "messages": [ {"role": '
    answer = _raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Authorization: Bearer " + demo.api_key.encode() + b"\r\n"
                  b"Content-Type: application/json\r\nConnection: close\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert answer.startswith(b"HTTP/1.1 400")
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["type"] == "invalid_request_error"
    # the server is still fine
    assert [m.id for m in client.models.list()] == [demo.model]


def test_two_accounts_cannot_spend_each_others_credits(env: Env, client: openai.OpenAI) -> None:
    portal, demo = env
    now = time.time()
    _rec, bob_key = portal.call(lambda: demo.coordinator.create_account(
        now, account_id="bob", initial_credits=50_000))
    _rec, eve_key = portal.call(lambda: demo.coordinator.create_account(now, account_id="eve"))
    alice_before = balance(portal, demo.coordinator, DEMO_ACCOUNT)
    with openai.OpenAI(base_url=demo.base_url, api_key=bob_key, max_retries=0) as bob:
        reply = bob.chat.completions.create(
            model=demo.model, max_tokens=6, messages=[{"role": "user", "content": "hi"}])
    assert reply.usage is not None
    _settled(portal, demo, "bob", 1)
    cost = job_cost(PRICE, reply.usage.prompt_tokens, reply.usage.completion_tokens)
    assert balance(portal, demo.coordinator, "bob") == (50_000 - cost, 0)
    with openai.OpenAI(base_url=demo.base_url, api_key=eve_key, max_retries=0) as eve, \
            pytest.raises(openai.APIStatusError) as broke:
        eve.chat.completions.create(model=demo.model, max_tokens=6,
                                    messages=[{"role": "user", "content": "hi"}])
    assert broke.value.status_code in {402, 429}
    assert balance(portal, demo.coordinator, "eve") == (0, 0)
    assert balance(portal, demo.coordinator, DEMO_ACCOUNT) == alice_before
    assert jobs_of(portal, demo.coordinator, "eve") == []
    assert all(j.account_id == "bob" for j in jobs_of(portal, demo.coordinator, "bob"))


def test_client_disconnect_aborts_the_job_and_charges_what_was_produced(
        env: Env, client: openai.OpenAI) -> None:
    portal, demo = env
    agent = demo.nodes[0].agent
    assert agent is not None
    before = balance(portal, demo.coordinator, DEMO_ACCOUNT)
    count = len(jobs_of(portal, demo.coordinator, DEMO_ACCOUNT))
    stream = client.chat.completions.create(
        model=demo.model, max_tokens=1500, temperature=1.0, stream=True,
        messages=[{"role": "user", "content": "Write a very long story"}])
    received = 0
    for chunk in stream:
        received += sum(1 for c in chunk.choices if c.delta.content)
        if received >= 3:
            break
    stream.close()
    closed = time.monotonic()
    wait_until(lambda: portal.call(lambda: len(agent.active)) == 0, 5, "the node to abort")
    assert time.monotonic() - closed < 1.0, "the node kept generating after the disconnect"
    jobs = _settled(portal, demo, DEMO_ACCOUNT, count + 1)
    job = jobs[-1]
    assert job.state == JobState.CANCELLED
    assert received <= job.completion_tokens < 1500
    assert job.charge == job_cost(PRICE, job.prompt_tokens, job.completion_tokens)
    assert balance(portal, demo.coordinator, DEMO_ACCOUNT) == (before[0] - job.charge, 0)


def test_demo_data_dir_holds_the_signed_snapshot(env: Env) -> None:
    _portal, demo = env
    snapshot = json.loads((demo.files.data_dir / "snapshot.json").read_text())
    files = snapshot["signed"]["models"][0]["files"]
    on_disk = {p.name: p.stat().st_size for p in Path(demo.files.model_dir).iterdir()
               if not p.name.startswith(".")}
    assert {f["path"]: f["size"] for f in files} == on_disk
