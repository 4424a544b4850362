"""The Agent: one node's controller. It holds the node key; the Runtime children hold none.

``Agent.run()`` registers (grant + challenge), then runs four loops until cancelled:

* heartbeat: reports load and the applied config hash; the answer carries the config pointer
  (a new hash starts a sync) and the jobs to abort. Every 0.5 s while jobs run, so a cancel
  reaches the Runtime within a second; the config's interval otherwise.
* sync: fetch the snapshot by hash, apply it with ``NodeTrustState`` (a refused one leaves the
  last good config in force and is not fetched again), persist the trust state, install the
  approved models (sha256 and size checked) and start one ``RuntimeSupervisor`` per model.
* lease: long polls for as many jobs as there are free slots; each job runs in its own task
  (``_jobs.run_job``), streaming events and ending with a signed Receipt.
* outbox: sends job events in order (batched) and receipts; the answers also name jobs to
  abort.

The Network learns which models the node serves and how many jobs it takes at registration,
so after a sync that changes either the Agent registers again (when no job is running). The
node takes as many jobs as the applied config allows (its runtime ``max_batch_size`` and
participation limit) unless the operator's ``max_concurrent_jobs`` is lower.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from resultity_core import (
    Capabilities,
    ChallengeResponse,
    Envelope,
    Heartbeat,
    LeaseRequest,
    NodeConfig,
    NodeTrustState,
    RegisterRequest,
    ResultityError,
    SecretKey,
    canonical_bytes,
)

from ._errors import NodeError, RegistrationError
from ._fleet import Fleet, Served
from ._jobs import ActiveJob, run_job
from ._models import ModelSource, Progress
from ._outbox import RETRY_S, Outbox
from ._sandbox import package_version
from ._supervisor import RuntimeSpec
from ._transport import NetworkTransport, SessionLostError, TransportError
from ._updates import AgentRestartRequired, Updater

__all__ = ["Agent", "save_trust_state"]

log = logging.getLogger("resultity.node")
_BUSY_HEARTBEAT_S = 0.5
_MAX_REFUSALS = 3
_HANDOFF_WAIT_S = 0.05  # at most this long for leased jobs to reach the Runtime


def save_trust_state(trust: NodeTrustState, path: Path) -> None:
    """Write ``trust.export_state()`` to ``path`` atomically with mode 0600."""
    data = canonical_bytes(trust.export_state())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _first(group: BaseExceptionGroup[Any], kind: type[NodeError]) -> NodeError | None:
    for exc in group.exceptions:
        if isinstance(exc, kind):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first(exc, kind)
            if found is not None:
                return found
    return None


class Agent:
    """Controls one node; see the module docstring. Build it with ``serve_node`` or directly."""

    def __init__(
        self, *, key: SecretKey, grant: Envelope, trust: NodeTrustState,
        transport: NetworkTransport, source: ModelSource, install_dir: Path, state_path: Path,
        runtime: RuntimeSpec, max_concurrent_jobs: int | None = None, device: str = "cpu",
        lease_wait_ms: int = 20_000, progress: Progress | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self.node_id = key.keyid
        self.grant = grant
        self.trust = trust
        self.transport = transport
        self.state_path = state_path
        self.max_concurrent_jobs = max_concurrent_jobs
        self.device = device
        self.lease_wait_ms = lease_wait_ms
        self.fleet = Fleet(source=source, install_dir=install_dir, runtime=runtime,
                           device=device, progress=progress)
        self.clock = clock
        self.code_version = package_version()
        self.version = self.code_version
        self.updater: Updater | None = None
        self.active: dict[str, ActiveJob] = {}
        self._job_runtimes: dict[str, Served] = {}
        self.refused: dict[str, str] = {}
        self.registered_models: tuple[str, ...] | None = None
        self.registered_batch = 0
        self.reported_hash: str | None = None
        self._syncing = False
        self.outbox = Outbox(transport, self.cancel_job)
        self._wake = anyio.Event()
        self._beat_now = anyio.Event()
        self._beat_urgent = False
        self._tg: anyio.abc.TaskGroup | None = None

    # ---- state -----------------------------------------------------------------------------

    @property
    def config(self) -> NodeConfig | None:
        """The NodeConfig in force, or None."""
        return self.trust.current

    @property
    def capacity(self) -> int:
        """How many jobs may run at once: the config's runtime batch size and participation
        limit, lowered by the operator's ``max_concurrent_jobs`` when set (0 without config)."""
        config = self.config
        if config is None:
            return 0
        limit = min(config.runtime.max_batch_size, config.participation.max_concurrent_jobs)
        cap = self.max_concurrent_jobs
        return limit if cap is None else min(cap, limit)

    def _offered_batch(self) -> int:
        # The batch the node registers with (the Network routes at most that many jobs).
        if self.config is not None:
            return max(1, self.capacity)
        return max(1, self.max_concurrent_jobs or 1)

    @property
    def runtimes(self) -> dict[str, Served]:
        """The models being served, by name."""
        return self.fleet.runtimes

    @property
    def install_errors(self) -> dict[str, str]:
        """Why approved models are not installed, by name."""
        return self.fleet.install_errors

    def ready_models(self) -> tuple[str, ...]:
        """Names of the models whose Runtime is ready."""
        return self.fleet.ready_models()

    def can_lease(self) -> bool:
        """True when the node may take jobs now."""
        config = self.config
        if self.updater is not None and self.updater.restart_requested:
            return False
        return (config is not None and self.registered_models is not None
                and config.participation.accept_jobs and self.clock() < config.expires_at
                and self.reported_hash == self.trust.current_hash and bool(self.ready_models()))

    def wake(self, *, heartbeat: bool = False) -> None:
        """Make the lease loop (and with ``heartbeat`` the heartbeat loop) look at the state
        again now."""
        self._wake.set()
        self._wake = anyio.Event()
        if heartbeat:
            self._beat_urgent = True
            self._recheck_heartbeat()

    def _recheck_heartbeat(self) -> None:
        # The heartbeat loop recomputes its interval (busy: 0.5 s from the last beat).
        self._beat_now.set()
        self._beat_now = anyio.Event()

    # ---- main ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Register and serve until cancelled. Raises RegistrationError when refused."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                config = self.config
                if config is not None and self.clock() < config.expires_at:
                    await self._apply_models(config)
                await self._register()
                tg.start_soon(self._heartbeat_loop)
                tg.start_soon(self._lease_loop)
                tg.start_soon(self.outbox.run)
                if self.updater is not None:
                    tg.start_soon(self.updater.run, tg)
                    tg.start_soon(self._restart_watch)
        except BaseExceptionGroup as group:
            for kind in (RegistrationError, AgentRestartRequired):
                found = _first(group, kind)
                if found is not None:
                    raise found from None
            raise

    async def _restart_watch(self) -> None:
        # After an update naming another agent version: stop taking jobs, let the running
        # ones and their events drain, then end ``run`` so a supervisor restarts the Agent.
        assert self.updater is not None
        while not (self.updater.restart_requested and not self.active and not self.outbox):
            with anyio.move_on_after(0.5):
                await self._wake.wait()
        raise AgentRestartRequired("the installed release needs the Agent to restart")

    def save_trust(self) -> None:
        """Persist the trust state (after applying a snapshot, release or root)."""
        save_trust_state(self.trust, self.state_path)

    async def _register(self) -> None:
        attempt = refusals = 0
        while True:
            models, batch = self.ready_models(), self._offered_batch()
            caps = Capabilities(models, batch, self.device)
            try:
                challenge = await self.transport.register(RegisterRequest(
                    self.key.public_key.hex, dict(self.grant.to_payload()), caps))
                signature = self.key.sign(bytes.fromhex(challenge.nonce)).hex()
                node_id = await self.transport.complete_registration(
                    ChallengeResponse(self.node_id, signature))
            except RegistrationError as exc:
                # Usually final (a bad or expired grant); retried a little in case the
                # Network restarted between the challenge and its answer.
                refusals += 1
                if refusals >= _MAX_REFUSALS:
                    raise
                log.warning("registration refused (%s); trying again", exc)
                await anyio.sleep(RETRY_S[refusals])
                continue
            except TransportError as exc:
                delay = RETRY_S[min(attempt, len(RETRY_S) - 1)]
                log.warning("cannot register (%s); retrying in %.1f s", exc, delay)
                attempt += 1
                await anyio.sleep(delay)
                continue
            if node_id != self.node_id:
                raise RegistrationError(f"admitted as {node_id!r}, expected {self.node_id!r}")
            self.registered_models, self.registered_batch = models, batch
            log.info("registered as node %s serving %s", self.node_id[:12], list(models))
            self.wake(heartbeat=True)
            return

    async def _heartbeat_loop(self) -> None:
        seq = 0
        failures = 0
        while True:
            if ((self.registered_models != self.ready_models()
                 or self.registered_batch != self._offered_batch())
                    and not self.active and not self.outbox and not self._syncing):
                await self._register()
            self._beat_urgent = False
            beat = Heartbeat(
                self.node_id, seq, self.reported_hash, self.version, len(self.active),
                max(0, self.capacity - len(self.active)) if self.can_lease() else 0,
                "ready" if self.can_lease() else "syncing",
                update_status=self.updater.status if self.updater is not None else None,
            )
            try:
                answer = await self.transport.heartbeat(beat)
            except SessionLostError:
                await self._register()
                continue
            except TransportError as exc:
                failures += 1
                log.warning("heartbeat failed: %s", exc)
                await anyio.sleep(RETRY_S[min(failures, len(RETRY_S) - 1)])
                continue
            failures = 0
            seq += 1
            for job_id in answer.cancel:
                self.cancel_job(job_id)
            target = answer.config_hash
            if (target is not None and target != self.trust.current_hash
                    and target not in self.refused and not self._syncing):
                self._syncing = True
                assert self._tg is not None
                self._tg.start_soon(self._sync, target)
            last = anyio.current_time()
            while not self._beat_urgent:
                left = last + self._heartbeat_interval() - anyio.current_time()
                if left <= 0:
                    break
                event = self._beat_now
                with anyio.move_on_after(left):
                    await event.wait()

    def _heartbeat_interval(self) -> float:
        config = self.config
        idle = config.network.heartbeat_interval_ms / 1000 if config else 1.0
        return min(idle, _BUSY_HEARTBEAT_S) if self.active else idle

    # ---- config ----------------------------------------------------------------------------

    async def _sync(self, config_hash: str) -> None:
        try:
            try:
                envelope = await self.transport.fetch_snapshot(config_hash)
            except TransportError as exc:
                log.warning("cannot fetch snapshot %s: %s", config_hash, exc)
                return
            try:
                config = self.trust.apply(envelope, now=int(self.clock()),
                                          expected_hash=config_hash)
            except ResultityError as exc:
                self.refused[config_hash] = f"{type(exc).__name__}: {exc}"
                log.error("refused snapshot %s: %s (keeping %s)", config_hash,
                          self.refused[config_hash], self.trust.current_hash)
                return
            save_trust_state(self.trust, self.state_path)
            log.info("applied node-config v%d (%s)", config.version, config_hash)
            await self._apply_models(config)
        finally:
            self._syncing = False
            self.wake(heartbeat=True)

    async def _apply_models(self, config: NodeConfig) -> None:
        assert self._tg is not None
        await self.fleet.apply(config, self._tg)
        self.reported_hash = self.trust.current_hash

    # ---- jobs ------------------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        failures = 0
        while True:
            free = self.capacity - len(self.active)
            if not self.can_lease() or free <= 0:
                with anyio.move_on_after(0.5):
                    await self._wake.wait()
                continue
            try:
                batch = await self.transport.lease(
                    LeaseRequest(self.node_id, free, self.lease_wait_ms))
            except SessionLostError:
                await anyio.sleep(0.2)  # the heartbeat loop registers again
                continue
            except TransportError as exc:
                failures += 1
                log.warning("lease failed: %s", exc)
                await anyio.sleep(RETRY_S[min(failures, len(RETRY_S) - 1)])
                continue
            failures = 0
            assert self._tg is not None
            jobs = [ActiveJob(lease) for lease in batch.leases]
            for job in jobs:
                self.active[job.lease.job_id] = job
                self._tg.start_soon(self._run_job, job)
            if jobs:
                # The jobs reach the Runtime before the next poll and the heartbeat take
                # the loop (they are on the path to the first token).
                with anyio.move_on_after(_HANDOFF_WAIT_S):
                    for job in jobs:
                        await job.handed.wait()
                # Busy now: heartbeats (and cancels) every 0.5 s from the last one; not one
                # per lease (under load that was a heartbeat request per job).
                self._recheck_heartbeat()

    async def _run_job(self, job: ActiveJob) -> None:
        # The job keeps the Runtime it started on: a switch to a new version or update
        # moves only new jobs, and the old Runtime is drained (not stopped) under this one.
        served = self.fleet.acquire(job.lease.model)
        if served is not None:
            self._job_runtimes[job.lease.job_id] = served
        try:
            await run_job(job, served.supervisor if served is not None else None,
                          key=self.key, emit=self.outbox.put, clock=self.clock)
        finally:
            if served is not None:
                self.fleet.release(served)
            self._job_runtimes.pop(job.lease.job_id, None)
            self.active.pop(job.lease.job_id, None)
            self.wake()

    def cancel_job(self, job_id: str) -> None:
        """Abort a running job in its Runtime (the Network cancelled it)."""
        job = self.active.get(job_id)
        served = self._job_runtimes.get(job_id)
        supervisor = served.supervisor if served is not None else None
        if job is None or supervisor is None or job.cancelled:
            return
        job.cancelled = True
        assert self._tg is not None
        for runtime_id in job.runtime_ids:
            self._tg.start_soon(supervisor.abort, runtime_id)

    def status(self) -> dict[str, Any]:
        """Return a JSON-friendly summary (for logs, the CLI and tests)."""
        config = self.config
        return {
            "node_id": self.node_id,
            "registered_models": list(self.registered_models or ()),
            "config_version": config.version if config else None,
            "config_hash": self.trust.current_hash,
            "reported_hash": self.reported_hash,
            "runtimes": {n: s.supervisor.state for n, s in self.runtimes.items()},
            "active_jobs": len(self.active),
            "refused": dict(self.refused),
            "install_errors": dict(self.install_errors),
            "outbox": len(self.outbox),
            "version": self.version,
            "update_status": self.updater.status if self.updater is not None else None,
        }
