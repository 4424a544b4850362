"""``NodeSettings`` and ``serve_node``: build an Agent from a data directory and run it.

Data directory layout (created 0700)::

    node.key            Ed25519 node key (``resultity keys generate``), unless key_path
    grant.json          the account-signed NodeGrant envelope for that key, unless grant_path
    root.json           the trust root envelope (first use), unless trust_root_path
    trust-state.json    what the node trusts and has applied (rollback protection; 0600)
    models/             model source: <name>/<version>/<files>, unless models_dir
    installed/          verified model copies the Runtime loads
    runtime/            the Runtime children's private working directories
    runtimes/           installed releases: <version>/venv, downloads/, current.json
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

import anyio
import attrs

from resultity_core import (
    Envelope,
    NodeGrant,
    NodeTrustState,
    PayloadFormatError,
    SecretKey,
    load_key_file,
    load_trusted_root,
    save_key_file,
)

from ._agent import Agent, save_trust_state
from ._envs import current_python
from ._errors import NodeError
from ._models import LocalDirectorySource, Progress
from ._sandbox import SandboxLimits
from ._supervisor import RuntimeSpec
from ._transport import HTTPNetworkTransport, NetworkTransport, ReleaseTransport
from ._updates import Updater

__all__ = ["NodeSettings", "build_agent", "log_progress", "prepare_node_dir", "serve_node"]

log = logging.getLogger("resultity.node")


def _absolute(path: str | os.PathLike[str]) -> Path:
    # the Runtime child runs in its own working directory, so a relative path would not reach it
    return Path(path).absolute()


def _absolute_or_none(path: str | os.PathLike[str] | None) -> Path | None:
    return None if path is None else _absolute(path)


@attrs.frozen
class NodeSettings:
    """Where a node keeps its files and how it runs (paths default into ``data_dir``).

    Paths are made absolute on construction (relative to the current directory then).

    ``trust_root_digest`` pins the first trust root (``sha256:...``); without it the root file
    is trusted on first use. ``runtime_command`` replaces the Runtime child's command line
    (tests, containers); ``runtime_env`` is added to its cleared environment.
    ``max_concurrent_jobs`` caps the jobs run at once below what the applied NodeConfig allows
    (its runtime ``max_batch_size`` and participation limit); None: the config's.
    ``update_interval_s`` is how often the Agent looks for a new release or trust root (0:
    never); ``restart_for_agent_update`` makes the Agent end (``AgentRestartRequired``) after
    installing a release whose agent version differs from its own code, for a supervisor to
    restart it from the new environment (default: environment variable
    ``RESULTITY_NODE_RESTART_ON_UPDATE=1``, so a container can enable it).
    """

    network_url: str
    data_dir: Path = attrs.field(converter=_absolute)
    key_path: Path | None = attrs.field(default=None, converter=_absolute_or_none)
    grant_path: Path | None = attrs.field(default=None, converter=_absolute_or_none)
    trust_root_path: Path | None = attrs.field(default=None, converter=_absolute_or_none)
    trust_root_digest: str | None = None
    models_dir: Path | None = attrs.field(default=None, converter=_absolute_or_none)
    max_concurrent_jobs: int | None = None
    device: str = "cpu"
    lease_wait_ms: int = 20_000
    runtime_threads: int = 0
    runtime_command: tuple[str, ...] | None = None
    runtime_env: Mapping[str, str] = attrs.field(factory=dict)
    network_namespace: bool = True
    health_interval_s: float = 5.0
    progress: Progress | None = attrs.field(default=None, eq=False)
    update_interval_s: float = 60.0
    restart_for_agent_update: bool = attrs.field(
        factory=lambda: os.environ.get("RESULTITY_NODE_RESTART_ON_UPDATE", "") == "1")
    drain_timeout_s: float = 600.0

    def path(self, given: Path | None, default: str) -> Path:
        """Return ``given`` or ``data_dir / default``."""
        return given if given is not None else self.data_dir / default


def log_progress() -> Progress:
    """Return a progress callback that logs each file's hashing at 0, 25, 50, 75, 100 %."""
    shown: dict[tuple[str, str], int] = {}

    def progress(model: str, path: str, done: int, total: int) -> None:
        step = 100 if total == 0 else done * 4 // total * 25
        if shown.get((model, path), -1) < step:
            shown[(model, path)] = step
            log.info("checking %s %s: %d%% of %d bytes", model, path, step, total)

    return progress


def _load_json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NodeError(f"{what} {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise NodeError(f"{what} {path}: cannot read: {exc}") from None


def _load_trust(settings: NodeSettings, node_id: str, state_path: Path) -> NodeTrustState:
    if state_path.exists():
        state = _load_json(state_path, "trust state")
        if not isinstance(state, dict):
            raise NodeError(f"trust state {state_path}: not a JSON object")
        trust = NodeTrustState.restore(state)
        if trust.node_id != node_id:
            raise NodeError(f"trust state {state_path} belongs to node {trust.node_id[:12]}")
        return trust
    root_path = settings.path(settings.trust_root_path, "root.json")
    root_json = _load_json(root_path, "trust root")
    root = load_trusted_root(Envelope.from_payload(root_json), int(time.time()),
                             pinned_digest=settings.trust_root_digest)
    trust = NodeTrustState(root, node_id=node_id)
    save_trust_state(trust, state_path)
    return trust


def prepare_node_dir(
    data_dir: Path, *, node_key: SecretKey, grant: Envelope, trust_root: Envelope,
    overwrite: bool = False,
) -> None:
    """Write ``node.key`` (0600), ``grant.json`` and ``root.json`` into ``data_dir`` (0700).

    For the CLI and the demo: the files ``build_agent`` reads by default. Raises KeyFileError
    when the key file exists and ``overwrite`` is false, OSError when a file cannot be written.
    """
    data = Path(data_dir)
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    save_key_file(node_key, data / "node.key", overwrite=overwrite)
    for name, envelope in (("grant.json", grant), ("root.json", trust_root)):
        (data / name).write_text(json.dumps(envelope.to_payload(), indent=2) + "\n")


def build_agent(settings: NodeSettings, transport: NetworkTransport | None = None) -> Agent:
    """Return an Agent for ``settings`` (files loaded and checked, nothing started).

    Raises KeyFileError for the key, NodeError for a missing or unreadable grant, trust root
    or state file, PayloadFormatError for a grant that is not for this node's key, and the
    core's errors for a trust root that does not verify.
    """
    data = settings.data_dir
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = load_key_file(settings.path(settings.key_path, "node.key"))
    grant_json = _load_json(settings.path(settings.grant_path, "grant.json"), "grant")
    grant = Envelope.from_payload(grant_json)
    parsed = NodeGrant.from_payload(grant.signed)
    if parsed.node_public != key.public_key:
        raise PayloadFormatError("grant.node_public", "is not this node's key")
    state_path = data / "trust-state.json"
    trust = _load_trust(settings, key.keyid, state_path)
    secrets = (settings.path(settings.key_path, "node.key"),
               settings.path(settings.grant_path, "grant.json"))
    runtime = RuntimeSpec(
        workdir=data / "runtime", command=settings.runtime_command,
        limits=SandboxLimits(network_namespace=settings.network_namespace,
                             readonly_paths=(str(data.resolve()),),
                             hidden_paths=tuple(str(p.resolve()) for p in secrets)),
        threads=settings.runtime_threads, extra_env=dict(settings.runtime_env),
        health_interval_s=settings.health_interval_s,
    )
    installed = current_python(data)
    if installed is not None:  # a release installed earlier stays in force across restarts
        runtime = attrs.evolve(runtime, python=installed[1])
    agent = Agent(
        key=key, grant=grant, trust=trust,
        transport=transport or HTTPNetworkTransport(settings.network_url),
        source=LocalDirectorySource(settings.path(settings.models_dir, "models")),
        install_dir=data / "installed", state_path=state_path, runtime=runtime,
        max_concurrent_jobs=settings.max_concurrent_jobs, device=settings.device,
        lease_wait_ms=settings.lease_wait_ms,
        progress=settings.progress or log_progress(),
    )
    agent.fleet.drain_timeout_s = settings.drain_timeout_s
    if installed is not None:
        agent.version = installed[0]
    if settings.update_interval_s > 0 and hasattr(agent.transport, "fetch_release"):
        releases: ReleaseTransport = agent.transport  # type: ignore[assignment]
        agent.updater = Updater(agent, releases, runtimes_dir=data / "runtimes",
                                interval_s=settings.update_interval_s,
                                restart_agent=settings.restart_for_agent_update)
    return agent


async def serve_node(settings: NodeSettings, transport: NetworkTransport | None = None) -> None:
    """Run a node (Agent and Runtime children) until cancelled.

    Raises what ``build_agent`` raises, and RegistrationError when the Network refuses the
    node's grant or challenge.
    """
    agent = build_agent(settings, transport)
    try:
        await agent.run()
    finally:
        with anyio.CancelScope(shield=True):
            await agent.transport.aclose()
