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

The Network learns which models the node serves at registration, so after a sync that
changes the set of ready models the Agent registers again (when no job is running).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import attrs

from resultity_core import (
    Capabilities,
    ChallengeResponse,
    Envelope,
    Heartbeat,
    JobEvent,
    LeaseRequest,
    ModelEntry,
    NodeConfig,
    NodeTrustState,
    ReceiptSubmit,
    RegisterRequest,
    ResultityError,
    SecretKey,
    canonical_bytes,
)

from ._errors import ModelInstallError, RegistrationError
from ._frames import LoadModel
from ._jobs import ActiveJob, run_job
from ._models import ModelSource, Progress, install_model
from ._sandbox import package_version
from ._supervisor import RuntimeSpec, RuntimeSupervisor
from ._transport import NetworkTransport, SessionLostError, TransportError

__all__ = ["Agent", "save_trust_state"]

log = logging.getLogger("resultity.node")
_BUSY_HEARTBEAT_S = 0.5
_READY_WAIT_S = 30.0
_RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)


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


def _first(group: BaseExceptionGroup[Any], kind: type[RegistrationError]
           ) -> RegistrationError | None:
    for exc in group.exceptions:
        if isinstance(exc, kind):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first(exc, kind)
            if found is not None:
                return found
    return None


@attrs.define(eq=False)
class _Served:
    entry: ModelEntry
    supervisor: RuntimeSupervisor
    scope: anyio.CancelScope


class Agent:
    """Controls one node; see the module docstring. Build it with ``serve_node`` or directly."""

    def __init__(
        self, *, key: SecretKey, grant: Envelope, trust: NodeTrustState,
        transport: NetworkTransport, source: ModelSource, install_dir: Path, state_path: Path,
        runtime: RuntimeSpec, max_concurrent_jobs: int = 4, device: str = "cpu",
        lease_wait_ms: int = 20_000, progress: Progress | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self.node_id = key.keyid
        self.grant = grant
        self.trust = trust
        self.transport = transport
        self.source = source
        self.install_dir = install_dir
        self.state_path = state_path
        self.runtime = runtime
        self.max_concurrent_jobs = max_concurrent_jobs
        self.device = device
        self.lease_wait_ms = lease_wait_ms
        self.progress = progress
        self.clock = clock
        self.version = package_version()
        self.runtimes: dict[str, _Served] = {}
        self.active: dict[str, ActiveJob] = {}
        self.refused: dict[str, str] = {}
        self.install_errors: dict[str, str] = {}
        self.registered_models: tuple[str, ...] | None = None
        self.reported_hash: str | None = None
        self._syncing = False
        self._outbox: list[JobEvent | ReceiptSubmit] = []
        self._outbox_ready = anyio.Event()
        self._wake = anyio.Event()
        self._beat_now = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None

    # ---- state -----------------------------------------------------------------------------

    @property
    def config(self) -> NodeConfig | None:
        """The NodeConfig in force, or None."""
        return self.trust.current

    @property
    def capacity(self) -> int:
        """How many jobs may run at once under the config in force."""
        config = self.config
        limit = config.participation.max_concurrent_jobs if config else 0
        return min(self.max_concurrent_jobs, limit)

    def ready_models(self) -> tuple[str, ...]:
        """Names of the models whose Runtime is ready."""
        return tuple(sorted(n for n, s in self.runtimes.items()
                            if s.supervisor.state == "ready"))

    def can_lease(self) -> bool:
        """True when the node may take jobs now."""
        config = self.config
        return (config is not None and self.registered_models is not None
                and config.participation.accept_jobs and self.clock() < config.expires_at
                and self.reported_hash == self.trust.current_hash and bool(self.ready_models()))

    def wake(self, *, heartbeat: bool = False) -> None:
        """Make the lease loop (and with ``heartbeat`` the heartbeat loop) look at the state
        again now."""
        self._wake.set()
        self._wake = anyio.Event()
        if heartbeat:
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
                tg.start_soon(self._outbox_loop)
        except BaseExceptionGroup as group:
            refused = _first(group, RegistrationError)
            if refused is not None:
                raise refused from None
            raise

    async def _register(self) -> None:
        attempt = 0
        while True:
            models = self.ready_models()
            caps = Capabilities(models, max(1, self.max_concurrent_jobs), self.device)
            try:
                challenge = await self.transport.register(RegisterRequest(
                    self.key.public_key.hex, dict(self.grant.to_payload()), caps))
                signature = self.key.sign(bytes.fromhex(challenge.nonce)).hex()
                node_id = await self.transport.complete_registration(
                    ChallengeResponse(self.node_id, signature))
            except TransportError as exc:
                delay = _RETRY_S[min(attempt, len(_RETRY_S) - 1)]
                log.warning("cannot register (%s); retrying in %.1f s", exc, delay)
                attempt += 1
                await anyio.sleep(delay)
                continue
            if node_id != self.node_id:
                raise RegistrationError(f"admitted as {node_id!r}, expected {self.node_id!r}")
            self.registered_models = models
            log.info("registered as node %s serving %s", self.node_id[:12], list(models))
            self.wake(heartbeat=True)
            return

    async def _heartbeat_loop(self) -> None:
        seq = 0
        failures = 0
        while True:
            if (self.registered_models != self.ready_models() and not self.active
                    and not self._outbox and not self._syncing):
                await self._register()
            beat = Heartbeat(
                self.node_id, seq, self.reported_hash, self.version, len(self.active),
                max(0, self.capacity - len(self.active)) if self.can_lease() else 0,
                "ready" if self.can_lease() else "syncing",
            )
            try:
                answer = await self.transport.heartbeat(beat)
            except SessionLostError:
                await self._register()
                continue
            except TransportError as exc:
                failures += 1
                log.warning("heartbeat failed: %s", exc)
                await anyio.sleep(_RETRY_S[min(failures, len(_RETRY_S) - 1)])
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
            interval = self._heartbeat_interval()
            with anyio.move_on_after(interval):
                await self._beat_now.wait()

    def _heartbeat_interval(self) -> float:
        if self.active:
            return _BUSY_HEARTBEAT_S
        config = self.config
        return config.network.heartbeat_interval_ms / 1000 if config else 1.0

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

    def _spec(self, config: NodeConfig) -> RuntimeSpec:
        res = config.resources
        limits = attrs.evolve(
            self.runtime.limits,
            # CUDA reserves far more address space than it uses: limit it on CPU only.
            max_address_space=res.max_memory_bytes if self.device == "cpu" else 0,
            max_file_size=res.max_disk_bytes,
        )
        return attrs.evolve(self.runtime, limits=limits,
                            threads=res.max_cpu_threads or self.runtime.threads)

    async def _apply_models(self, config: NodeConfig) -> None:
        wanted = {m.name: m for m in config.models}
        for name, served in list(self.runtimes.items()):
            if wanted.get(name) != served.entry:
                log.info("stopping the runtime of %s (no longer approved as is)", name)
                served.scope.cancel()
                del self.runtimes[name]
        started: list[RuntimeSupervisor] = []
        for name, entry in wanted.items():
            if name in self.runtimes:
                continue
            try:
                path = await anyio.to_thread.run_sync(functools.partial(
                    install_model, entry, self.source, self.install_dir,
                    progress=self.progress))
            except ModelInstallError as exc:
                self.install_errors[name] = str(exc)
                log.error("not installing %s: %s", name, exc)
                continue
            self.install_errors.pop(name, None)
            rt = config.runtime
            load = LoadModel(name, str(path), device=self.device, backend=rt.backend,
                             max_num_seqs=rt.max_batch_size, max_model_len=rt.max_model_len,
                             kv_cache_bytes=rt.kv_cache_bytes or None)
            spec = attrs.evolve(self._spec(config), workdir=self.runtime.workdir / name.replace(
                "/", "--"))
            supervisor = RuntimeSupervisor(spec, load)
            served = _Served(entry, supervisor, anyio.CancelScope())
            self.runtimes[name] = served
            assert self._tg is not None
            self._tg.start_soon(self._run_runtime, served)
            started.append(supervisor)
        for supervisor in started:
            # Bounded: a model that loads slowly (or never) must not hold up the heartbeat's
            # config hash; the Network learns of it when it is ready (registration).
            try:
                await supervisor.wait_ready(min(_READY_WAIT_S, supervisor.spec.load_timeout_s))
            except ResultityError as exc:
                log.warning("%s", exc)
        self.reported_hash = self.trust.current_hash

    async def _run_runtime(self, served: _Served) -> None:
        with served.scope:
            await served.supervisor.run()

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
                await anyio.sleep(_RETRY_S[min(failures, len(_RETRY_S) - 1)])
                continue
            failures = 0
            assert self._tg is not None
            for lease in batch.leases:
                job = ActiveJob(lease)
                self.active[lease.job_id] = job
                self._tg.start_soon(self._run_job, job)
            if batch.leases:
                self.wake(heartbeat=True)  # busy now: heartbeats (and cancels) every 0.5 s

    async def _run_job(self, job: ActiveJob) -> None:
        try:
            served = self.runtimes.get(job.lease.model)
            await run_job(job, served.supervisor if served else None, key=self.key,
                          emit=self._emit, clock=self.clock)
        finally:
            self.active.pop(job.lease.job_id, None)
            self.wake()

    def cancel_job(self, job_id: str) -> None:
        """Abort a running job in its Runtime (the Network cancelled it)."""
        job = self.active.get(job_id)
        served = self.runtimes.get(job.lease.model) if job is not None else None
        if job is None or served is None or job.cancelled:
            return
        job.cancelled = True
        assert self._tg is not None
        for runtime_id in job.runtime_ids:
            self._tg.start_soon(served.supervisor.abort, runtime_id)

    def _emit(self, item: JobEvent | ReceiptSubmit) -> None:
        self._outbox.append(item)
        self._outbox_ready.set()

    async def _outbox_loop(self) -> None:
        failures = 0
        while True:
            if not self._outbox:
                self._outbox_ready = anyio.Event()
                await self._outbox_ready.wait()
                continue
            head = self._outbox[0]
            try:
                if isinstance(head, ReceiptSubmit):
                    count = 1
                    await self.transport.submit_receipt(head)
                    cancel: tuple[str, ...] = ()
                else:
                    events = self._take_events()
                    count = len(events)
                    cancel = await self.transport.post_events(events)
            except TransportError as exc:
                if exc.retryable and not isinstance(exc, SessionLostError):
                    failures += 1
                    await anyio.sleep(_RETRY_S[min(failures, len(_RETRY_S) - 1)])
                    continue
                log.warning("the network refused %s: %s", type(head).__name__, exc)
                cancel = ()
                count = 1 if isinstance(head, ReceiptSubmit) else len(self._take_events())
            failures = 0
            del self._outbox[:count]
            for job_id in cancel:
                self.cancel_job(job_id)

    def _take_events(self) -> list[JobEvent]:
        out: list[JobEvent] = []
        for item in self._outbox:
            if not isinstance(item, JobEvent) or len(out) >= 256:
                break
            out.append(item)
        return out

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
            "outbox": len(self._outbox),
        }
