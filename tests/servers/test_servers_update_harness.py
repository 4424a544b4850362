"""Shared set-up for the update tests (no tests here): a Network and one node over HTTP.

The node runs the fake Runtime (``test_servers_node_fakeruntime.py``) through the
interpreter of the environment in use (``"{python}"``), so after an update its Runtime
really runs from the new versioned environment.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import attrs

from resultity_core import (
    Artifact,
    Envelope,
    NetworkParams,
    NodeConfig,
    NodeGrant,
    Participation,
    Price,
    Release,
    Resources,
    RuntimeParams,
    SecretKey,
    TrustRoot,
    generate_key,
    make_root,
    sign_envelope,
    sign_grant,
)
from resultity_servers._http import HTTPServer
from resultity_servers.network import CoordinatorSettings, NetworkAdminClient, NetworkApp
from resultity_servers.network._app_releases import ReleaseRoutes, release_routes
from resultity_servers.network._release_admin import publish_release, upload_artifact
from resultity_servers.network._releases import artifact_address
from resultity_servers.network._serve import NetworkSettings, running_network
from resultity_servers.node import (
    Agent,
    AgentRestartRequired,
    HTTPNetworkTransport,
    NodeSettings,
    build_agent,
    model_entry_for_dir,
    prepare_node_dir,
)

FAKE = Path(__file__).with_name("test_servers_node_fakeruntime.py")
WHEEL_VERSIONS = ("0.9.1", "0.9.2")


async def until(condition: Callable[[], object], timeout: float = 15.0) -> None:
    """Wait (bounded) until ``condition()`` is true."""
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.02)


@attrs.define
class World:
    """Keys, trust root, node directory and NodeConfig of one test."""

    now: int
    data: Path
    log: Path
    account: SecretKey
    root_key: SecretKey
    config_key: SecretKey
    release_keys: list[SecretKey]
    root: TrustRoot
    config: NodeConfig

    def root_envelope(self) -> Envelope:
        return sign_envelope(self.root.to_payload(), [self.root_key])


def make_world(tmp_path: Path, *, release_threshold: int = 2) -> World:
    """Return a node directory with a key, grant, trust root (two release keys) and model."""
    now = int(time.time())
    data = tmp_path / "node"
    (data / "models" / "echo" / "1").mkdir(parents=True)
    (data / "models" / "echo" / "1" / "weights.bin").write_bytes(b"w" * 1000)
    key, account, root_key, config_key = (generate_key() for _ in range(4))
    release_keys = [generate_key(), generate_key()]
    grant = sign_grant(NodeGrant("acct-1", key.public_key, now - 10, now + 3600), account)
    root = make_root(version=1, expires_at=now + 86_400, role_keys={
        "root": [root_key.public_key], "config": [config_key.public_key],
        "release": [k.public_key for k in release_keys], "network": [root_key.public_key]},
        thresholds={"release": release_threshold})
    prepare_node_dir(data, node_key=key, grant=grant,
                     trust_root=sign_envelope(root.to_payload(), [root_key]))
    entry = model_entry_for_dir(data / "models" / "echo" / "1", "echo", "1", Price(1, 1))
    config = NodeConfig(
        version=1, issued_at=now - 10, expires_at=now + 3600, models=(entry,),
        runtime=RuntimeParams("auto", 4, 256, 0),
        network=NetworkParams(("http://127.0.0.1:9",), 200, 1000, 10_000),
        participation=Participation(True, 4, 1000), resources=Resources(0, 0, 0))
    return World(now, data, tmp_path / "fake.log", account, root_key, config_key,
                 release_keys, root, config)


def sign_release(world: World, version: int, artifacts: Sequence[tuple[str, bytes]],
                 keys: Sequence[SecretKey], runtime_version: str = "9.9.9", *,
                 agent_version: str | None = None, expires_in: int = 3600) -> Envelope:
    """Return a Release naming ``artifacts`` (name, bytes) signed by ``keys``."""
    release = Release(version, agent_version or runtime_version, runtime_version,
                      tuple(Artifact(n, artifact_address(d), len(d)) for n, d in artifacts),
                      world.now - 10, world.now + expires_in)
    return sign_envelope(release.to_payload(), keys)


@attrs.define
class Running:
    """A running Network and node."""

    server: HTTPServer
    app: NetworkApp
    agent: Agent
    routes: ReleaseRoutes
    admin: NetworkAdminClient
    tg: anyio.abc.TaskGroup
    restart: list[AgentRestartRequired] = attrs.field(factory=list)

    async def publish(self, envelope: Envelope, artifacts: Sequence[bytes]) -> None:
        for data in artifacts:
            await upload_artifact(self.admin, data)
        await publish_release(self.admin, envelope)

    def status(self) -> str:
        assert self.agent.updater is not None
        return self.agent.updater.status


@asynccontextmanager
async def running(world: World, *, trusted_network: bool = True, mode: str = "ok",
                  interval_s: float = 0.2, data_dir: Path | None = None, fake: bool = True,
                  script: Path = FAKE, prove_timeout_s: float = 30.0,
                  ) -> AsyncIterator[Running]:
    """Run a Network (checking releases against the root unless ``trusted_network`` is
    False: then it serves whatever it is given, as a compromised one would) and the node,
    with the fake Runtime (``mode``) or, unless ``fake``, the real sandboxed one."""
    settings = NetworkSettings(
        port=0, service_token="svc", max_lease_wait_s=0.5, data_dir=str(data_dir)
        if data_dir is not None else None,
        coordinator=CoordinatorSettings(trust_root=world.root if trusted_network else None))
    async with running_network(settings) as (server, app):
        coordinator = app.coordinator
        coordinator.create_account(world.now, account_id="acct-1",
                                   public_key=world.account.public_key)
        coordinator.create_account(world.now, account_id="buyer", initial_credits=10**9)
        coordinator.publish_config(
            sign_envelope(world.config.to_payload(), [world.config_key]), world.now)
        command = ("{python}", str(script), mode, str(world.log)) if fake else None
        node = NodeSettings(network_url=server.url, data_dir=world.data, lease_wait_ms=500,
                            runtime_command=command, runtime_threads=1,
                            update_interval_s=interval_s, network_namespace=not fake)
        agent = build_agent(node, transport=HTTPNetworkTransport(server.url))
        agent.fleet.prove_timeout_s = prove_timeout_s
        routes = release_routes(app)
        assert routes is not None
        async with NetworkAdminClient(server.url, "svc") as admin, \
                anyio.create_task_group() as tg:
            restart: list[AgentRestartRequired] = []

            async def run_agent() -> None:
                try:
                    await agent.run()
                except AgentRestartRequired as exc:
                    restart.append(exc)

            tg.start_soon(run_agent)
            await until(lambda: any(n.state == "ready" for n in coordinator.list_nodes()))
            try:
                yield Running(server, app, agent, routes, admin, tg, restart)
            finally:
                tg.cancel_scope.cancel()
        await agent.transport.aclose()


def submit(run: Running, prompt: str, max_tokens: int) -> str:
    """Submit a completion job for ``echo``; returns its id."""
    job = run.app.coordinator.submit_job(
        "buyer", "echo", {"model": "echo", "prompt": prompt, "max_tokens": max_tokens},
        prompt_tokens_estimate=10, max_tokens=max_tokens, now=time.time())
    run.app.wake()
    return job.job_id
