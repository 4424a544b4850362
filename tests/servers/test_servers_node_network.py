"""The Agent over HTTP against the real Network app (fake Runtime child, in-memory store)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from resultity_core import (
    JobState,
    NetworkParams,
    NodeConfig,
    NodeGrant,
    Participation,
    Price,
    Resources,
    RuntimeParams,
    generate_key,
    make_root,
    sign_envelope,
    sign_grant,
)
from resultity_servers.network import CoordinatorSettings
from resultity_servers.network._serve import NetworkSettings, running_network
from resultity_servers.node import (
    HTTPNetworkTransport,
    NodeSettings,
    RegistrationError,
    build_agent,
    model_entry_for_dir,
    prepare_node_dir,
)

FAKE = Path(__file__).with_name("test_servers_node_fakeruntime.py")
pytestmark = pytest.mark.anyio


async def until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.02)


async def test_a_node_serves_jobs_through_the_network_over_http(tmp_path: Path) -> None:
    now = int(time.time())
    data = tmp_path / "node"
    (data / "models" / "echo" / "1").mkdir(parents=True)
    (data / "models" / "echo" / "1" / "weights.bin").write_bytes(b"w" * 5000)
    key, account, config_key, root_key = (generate_key() for _ in range(4))
    grant = sign_grant(NodeGrant("acct-1", key.public_key, now - 10, now + 3600), account)
    root = make_root(version=1, expires_at=now + 86_400, role_keys={
        "root": [root_key.public_key], "config": [config_key.public_key],
        "release": [root_key.public_key], "network": [root_key.public_key]})
    prepare_node_dir(data, node_key=key, grant=grant,
                     trust_root=sign_envelope(root.to_payload(), [root_key]))
    entry = model_entry_for_dir(data / "models" / "echo" / "1", "echo", "1", Price(1000, 2000))
    config = NodeConfig(
        version=1, issued_at=now - 10, expires_at=now + 3600, models=(entry,),
        runtime=RuntimeParams("auto", 4, 256, 0),
        network=NetworkParams(("http://127.0.0.1:9",), 200, 1000, 10_000),
        participation=Participation(True, 2, 1000), resources=Resources(0, 0, 0))
    log = tmp_path / "fake.log"
    network_settings = NetworkSettings(
        port=0, service_token="svc", max_lease_wait_s=0.5,
        coordinator=CoordinatorSettings(trust_root=root))
    async with running_network(network_settings) as (server, app):
        coordinator = app.coordinator
        coordinator.create_account(now, account_id="acct-1", public_key=account.public_key)
        buyer, _ = coordinator.create_account(now, account_id="buyer",
                                              initial_credits=10_000_000)
        coordinator.publish_config(sign_envelope(config.to_payload(), [config_key]), now)
        settings = NodeSettings(
            network_url=server.url, data_dir=data, lease_wait_ms=500,
            runtime_command=(sys.executable, str(FAKE), "ok", str(log)))
        agent = build_agent(settings, transport=HTTPNetworkTransport(server.url))
        async with anyio.create_task_group() as tg:
            tg.start_soon(agent.run)
            await until(lambda: any(n.state == "ready" for n in coordinator.list_nodes()))
            request = {"model": "echo", "prompt": "over the wire", "max_tokens": 3}
            job = coordinator.submit_job("buyer", "echo", request, prompt_tokens_estimate=10,
                                         max_tokens=3, now=time.time())
            app.wake()
            await until(lambda: coordinator.get_job(job.job_id).settled)
            done = coordinator.get_job(job.job_id)
            with coordinator.store.transaction() as tx:
                receipt = tx.get_receipt(job.job_id)
            view = coordinator.job_events(job.job_id)
            long = coordinator.submit_job("buyer", "echo", {"model": "echo", "prompt": "x y",
                                                            "max_tokens": 100_000},
                                          prompt_tokens_estimate=10, max_tokens=100_000,
                                          now=time.time())
            app.wake()
            await until(lambda: len(coordinator.job_events(long.job_id).events) >= 2)
            started = time.monotonic()
            coordinator.cancel_job(long.job_id, time.time())
            await until(lambda: any(line.startswith("abort") for line in
                                    log.read_text().splitlines()), timeout=5)
            cancel_s = time.monotonic() - started
            tg.cancel_scope.cancel()
        await agent.transport.aclose()
    assert done.state == JobState.DONE
    assert "".join(e.text for e in view.events if e.kind == "token") == "over the wire"
    assert (done.prompt_tokens, done.completion_tokens) == (3, 3)
    assert done.charge is not None
    assert done.charge > 0  # settled at once: by the node's receipt, not the receipt timeout
    assert buyer.account_id == "buyer"
    assert receipt is not None
    assert receipt.node_id == agent.node_id
    assert cancel_s < 1.0


async def test_a_node_with_a_bad_grant_is_refused(tmp_path: Path) -> None:
    now = int(time.time())
    data = tmp_path / "node"
    key, account, impostor, root_key = (generate_key() for _ in range(4))
    grant = sign_grant(NodeGrant("acct-1", key.public_key, now - 10, now + 3600), impostor)
    root = make_root(version=1, expires_at=now + 86_400, role_keys={
        r: [root_key.public_key] for r in ("root", "config", "release", "network")})
    prepare_node_dir(data, node_key=key, grant=grant,
                     trust_root=sign_envelope(root.to_payload(), [root_key]))
    async with running_network(NetworkSettings(port=0, service_token="svc")) as (server, app):
        app.coordinator.create_account(now, account_id="acct-1", public_key=account.public_key)
        agent = build_agent(NodeSettings(network_url=server.url, data_dir=data),
                            transport=HTTPNetworkTransport(server.url))
        with anyio.fail_after(10), pytest.raises(RegistrationError, match="refused"):
            await agent.run()
        await agent.transport.aclose()
        assert app.coordinator.list_nodes() == []


@pytest.mark.slow
async def test_the_real_runtime_serves_a_chat_job_through_the_network(tmp_path: Path) -> None:
    from resultity_runtime import init_model_dir

    now = int(time.time())
    data = tmp_path / "node"
    model_dir = init_model_dir(data / "models" / "tiny" / "1", "tiny", seed=0)
    key, account, config_key, root_key = (generate_key() for _ in range(4))
    root = make_root(version=1, expires_at=now + 86_400, role_keys={
        "root": [root_key.public_key], "config": [config_key.public_key],
        "release": [root_key.public_key], "network": [root_key.public_key]})
    prepare_node_dir(
        data, node_key=key,
        grant=sign_grant(NodeGrant("acct-1", key.public_key, now - 10, now + 3600), account),
        trust_root=sign_envelope(root.to_payload(), [root_key]))
    entry = model_entry_for_dir(model_dir, "tiny", "1", Price(1000, 2000))
    config = NodeConfig(
        version=1, issued_at=now - 10, expires_at=now + 3600, models=(entry,),
        runtime=RuntimeParams("auto", 4, 256, 8 << 20),
        network=NetworkParams(("http://127.0.0.1:9",), 200, 1000, 60_000),
        participation=Participation(True, 2, 1000), resources=Resources(8 << 30, 1 << 30, 1))
    async with running_network(NetworkSettings(
            port=0, service_token="svc", max_lease_wait_s=0.5,
            coordinator=CoordinatorSettings(trust_root=root))) as (server, app):
        coordinator = app.coordinator
        coordinator.create_account(now, account_id="acct-1", public_key=account.public_key)
        coordinator.create_account(now, account_id="buyer", initial_credits=10_000_000)
        coordinator.publish_config(sign_envelope(config.to_payload(), [config_key]), now)
        agent = build_agent(NodeSettings(network_url=server.url, data_dir=data,
                                         lease_wait_ms=500))
        async with anyio.create_task_group() as tg:
            tg.start_soon(agent.run)
            await until(lambda: any(n.state == "ready" for n in coordinator.list_nodes()),
                        timeout=120)
            request = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}],
                       "max_tokens": 6, "temperature": "0", "logprobs": True,
                       "top_logprobs": 2}
            job = coordinator.submit_job("buyer", "tiny", request, prompt_tokens_estimate=64,
                                         max_tokens=6, now=time.time())
            app.wake()
            await until(lambda: coordinator.get_job(job.job_id).settled, timeout=60)
            sandbox = agent.runtimes["tiny"].supervisor.sandbox
            tg.cancel_scope.cancel()
        await agent.transport.aclose()
    done = coordinator.get_job(job.job_id)
    events = coordinator.job_events(job.job_id).events
    tokens = [e for e in events if e.kind == "token"]
    assert done.state == JobState.DONE
    assert done.completion_tokens == sum(len(e.token_ids) for e in tokens) > 0
    assert all(len(lp["top_logprobs"]) == 2 for e in tokens for lp in e.logprobs or ())
    assert sandbox["max_address_space"] == 8 << 30
    assert sandbox["max_file_size"] == 1 << 30
    if sandbox["network_namespace"]:  # where the platform allows namespaces at all
        assert sandbox["hidden_paths"] == [str((data / n).resolve())
                                           for n in ("node.key", "grant.json")]
        assert sandbox["readonly_paths"] == [str(data.resolve())]
