"""The Agent's updater: trust-root rotations and signed releases from the Network.

Every ``interval_s`` (and once at start) ``Updater.check_once``:

1. fetches the release pointer (``ReleaseTransport.fetch_release``) with the roots newer than
   the node's; each is applied in order with ``NodeTrustState.update_root`` (signed by a
   threshold of the old and the new root keys) and the trust state is saved, so snapshots
   and releases signed by the new keys verify afterwards;
2. checks the current Release with ``check_release`` against the root in force and the
   release already applied (threshold of the ``release`` role, not expired, not from the
   future, not older than the applied one: rollback refused);
3. downloads each artifact and checks its size and sha256 against the manifest;
4. installs them into ``runtimes/<runtime_version>`` beside the current environment
   (``_envs.install_environment``);
5. starts a Runtime from the new environment for every served model and has each answer a
   real generation; only then do new jobs go to them, while jobs in flight finish on the old
   Runtimes, which are then stopped (``Fleet.switch_runtime``);
6. applies the release to the trust state (rollback bound), records ``runtimes/current.json``
   and reports the outcome to the Network.

Any failure leaves the previous version serving; the reason is kept in ``status`` (reported
to the Network in the Agent's heartbeats and shown in ``Agent.status()``) and that release is
not tried again (a newer one is). Transport failures are retried at the next check.

The Agent's own code: the Runtime switch happens in process; the Agent process keeps running
the code it started with. When the release names another ``agent_version`` and
``restart_agent`` is set, the updater asks the Agent to exit (``AgentRestartRequired``,
exit status ``RESTART_EXIT_CODE`` from the CLI) once no job is running, so that its
supervisor (systemd, a container restart policy, ``deploy/node-entrypoint.sh``) starts it
again from the new environment (``current_python``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import attrs

from resultity_core import Release, ResultityError, as_envelope, check_release, sha256_digest

from ._envs import install_environment, write_current
from ._errors import NodeError
from ._transport import ReleaseTransport, TransportError

if TYPE_CHECKING:
    from ._agent import Agent

__all__ = ["RESTART_EXIT_CODE", "AgentRestartRequired", "UpdateError", "Updater"]

log = logging.getLogger("resultity.node.update")
RESTART_EXIT_CODE = 75


class UpdateError(NodeError):
    """A release could not be used (bad artifact, install or health check failed)."""


class AgentRestartRequired(NodeError):
    """The Agent must restart to run the code of the release it installed."""


class Updater:
    """Keeps one Agent on the newest valid release; see the module docstring."""

    def __init__(
        self, agent: Agent, transport: ReleaseTransport, *, runtimes_dir: Path,
        interval_s: float = 60.0, restart_agent: bool = False,
        clock: Callable[[], float] = time.time, install_timeout_s: float = 300.0,
    ) -> None:
        self.agent = agent
        self.transport = transport
        self.runtimes_dir = runtimes_dir
        self.interval_s = interval_s
        self.restart_agent = restart_agent
        self.clock = clock
        self.install_timeout_s = install_timeout_s
        self.status = "no release applied"
        self.refused: dict[str, str] = {}
        self.restart_requested = False
        self._reported: str | None = None

    async def run(self, tg: anyio.abc.TaskGroup) -> None:
        """Check for updates every ``interval_s`` until cancelled."""
        while True:
            try:
                await self.check_once(tg)
            except TransportError as exc:
                log.warning("cannot check for updates: %s", exc)
            await anyio.sleep(self.interval_s)

    async def check_once(self, tg: anyio.abc.TaskGroup) -> None:
        """Apply new roots and the current release, if any (module docstring)."""
        trust = self.agent.trust
        pointer = await self.transport.fetch_release(trust.root.version)
        roots = pointer.get("roots") or []
        for item in sorted(roots, key=_root_version):
            if _root_version(item) <= trust.root.version:
                continue
            try:
                new = trust.update_root(item, now=int(self.clock()))
            except ResultityError as exc:
                self._set_status(f"refused trust root: {type(exc).__name__}: {exc}")
                break
            self.agent.save_trust()
            self.agent.refused.clear()  # snapshots refused under the old keys may pass now
            log.info("trust root rotated to v%d", new.version)
        envelope = pointer.get("release")
        if envelope is not None:
            await self._consider(envelope, tg)
        await self._report()

    async def _consider(self, raw: Any, tg: anyio.abc.TaskGroup) -> None:
        trust = self.agent.trust
        try:
            env = as_envelope(raw)
            digest = env.digest()
        except ResultityError as exc:
            self._set_status(f"refused release: malformed: {exc}")
            return
        if digest == trust.release_hash or digest in self.refused:
            return
        now = int(self.clock())
        try:
            release, _ = check_release(
                env, trust.root, now,
                applied_version=trust.release.version if trust.release else None,
                applied_hash=trust.release_hash, skew=trust.skew)
        except ResultityError as exc:
            self._refuse(digest, f"refused release: {type(exc).__name__}: {exc}")
            return
        self._set_status(f"installing release v{release.version} ({release.runtime_version})")
        try:
            python = await self._install(release)
            await self._switch(python, tg)
        except (ResultityError, OSError) as exc:
            self._refuse(digest, f"release v{release.version} failed, staying on "
                                 f"{self.agent.version}: {type(exc).__name__}: {exc}")
            return
        trust.apply_release(env, now=now, expected_hash=digest)
        self.agent.save_trust()
        write_current(self.runtimes_dir, release.runtime_version, python, release.version)
        self.agent.version = release.runtime_version
        self._set_status(f"running release v{release.version} ({release.runtime_version})")
        if release.agent_version != self.agent.code_version and self.restart_agent:
            self.restart_requested = True
            log.warning("agent %s must restart to run %s", self.agent.code_version,
                        release.agent_version)
            self.agent.wake()

    async def _install(self, release: Release) -> Path:
        store = self.runtimes_dir / "downloads"
        store.mkdir(parents=True, exist_ok=True)
        wheels = []
        for item in release.artifacts:
            data = await self.transport.fetch_artifact(item.sha256)
            if len(data) != item.size:
                raise UpdateError(f"artifact {item.name} has {len(data)} bytes, the manifest "
                                  f"says {item.size}")
            actual = sha256_digest(data)
            if actual != item.sha256:
                raise UpdateError(f"artifact {item.name} hashes to {actual}, the manifest "
                                  f"says {item.sha256}")
            path = store / item.name
            await anyio.to_thread.run_sync(path.write_bytes, data)
            wheels.append(path)
        return await anyio.to_thread.run_sync(
            lambda: install_environment(self.runtimes_dir, release.runtime_version, wheels,
                                        timeout_s=self.install_timeout_s))

    async def _switch(self, python: Path, tg: anyio.abc.TaskGroup) -> None:
        fleet = self.agent.fleet
        base = attrs.evolve(fleet.runtime, python=str(python))
        config = self.agent.config
        if config is None or not fleet.runtimes:
            fleet.runtime = base  # nothing to health-check: later Runtimes start from it
            return
        await fleet.switch_runtime(base, config, tg)

    def _refuse(self, digest: str, why: str) -> None:
        self.refused[digest] = why
        self._set_status(why)

    def _set_status(self, status: str) -> None:
        if status != self.status:
            log.info("update: %s", status)
        self.status = status

    async def _report(self) -> None:
        # the heartbeat carries ``status``; a new outcome asks for a beat now
        if self._reported != self.status:
            self._reported = self.status
            self.agent.wake(heartbeat=True)


def _root_version(item: object) -> int:
    signed = item.get("signed") if isinstance(item, dict) else None
    version = signed.get("version") if isinstance(signed, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else 0
