"""The Agent's models: install what a NodeConfig approves and run one Runtime child per model.

``Fleet.apply(config, task_group)`` installs (sha256 and size checked, in a worker thread)
each approved model and brings its Runtime in line with the config:

* a model not running yet gets a ``RuntimeSupervisor`` at once (the Network learns of it
  when it is ready);
* a model whose entry (e.g. a new version), engine settings or limits changed gets a new
  Runtime *beside* the old one; once it is ready and has answered a real generation
  (``prove``), new jobs go to it and the old one is drained (its jobs finish) and stopped,
  and an old version's installed files are removed. If the new Runtime fails, the old one
  keeps serving and the reason is kept in ``install_errors``;
* a model no longer approved is drained and stopped.

``switch_runtime(spec, config, task_group)`` does the same for every model at once when the
Runtime itself changes (an update: a new interpreter/environment): all new Runtimes must
prove themselves before any switch; otherwise they are stopped and the old ones stay.

Jobs hold the ``Served`` they started on (``acquire`` / ``release``), so a switch never moves
a running job; draining waits (at most ``drain_timeout_s``) for them to end.
"""

from __future__ import annotations

import functools
import logging
import shutil
import uuid
from pathlib import Path

import anyio
import anyio.abc
import attrs

from resultity_core import ModelEntry, NodeConfig, ResultityError

from ._errors import ModelInstallError, RuntimeFailedError
from ._frames import Generate, LoadModel
from ._models import ModelSource, Progress, install_model, installed_path
from ._supervisor import RuntimeSpec, RuntimeSupervisor

__all__ = ["Fleet", "Served", "prove_runtime"]

log = logging.getLogger("resultity.node")
READY_WAIT_S = 30.0
HEALTH_PROMPT = "Hello"


async def prove_runtime(supervisor: RuntimeSupervisor, timeout_s: float) -> None:
    """Return once ``supervisor`` is ready and has streamed a real generation to its end.

    Raises RuntimeFailedError (not ready, no tokens, an error, or over ``timeout_s``).
    """
    try:
        with anyio.fail_after(timeout_s):
            await supervisor.wait_ready(timeout_s)
            frame = Generate(f"health-{uuid.uuid4().hex[:12]}", HEALTH_PROMPT, None,
                             {"max_tokens": 2, "temperature": "0"})
            produced = finished = False
            async for event in supervisor.generate(frame):
                produced = produced or bool(event.token_ids or event.text)
                finished = event.usage is not None
    except TimeoutError:
        raise RuntimeFailedError(f"health generation not done within {timeout_s:g} s "
                                 f"(state {supervisor.state}, {supervisor.last_error})") from None
    except ResultityError as exc:
        raise RuntimeFailedError(f"health generation failed: {exc}") from None
    if not (produced and finished):
        raise RuntimeFailedError("health generation produced no tokens")


@attrs.define(eq=False)
class Served:
    """One approved model, its Runtime supervisor and the scope that stops it."""

    entry: ModelEntry
    supervisor: RuntimeSupervisor
    scope: anyio.CancelScope
    users: int = 0


class Fleet:
    """The models a node serves (``runtimes``) and why others are not (``install_errors``)."""

    def __init__(self, *, source: ModelSource, install_dir: Path, runtime: RuntimeSpec,
                 device: str, progress: Progress | None, drain_timeout_s: float = 600.0,
                 prove_timeout_s: float = READY_WAIT_S) -> None:
        self.source = source
        self.install_dir = install_dir
        self.runtime = runtime
        self.device = device
        self.progress = progress
        self.drain_timeout_s = drain_timeout_s
        self.prove_timeout_s = prove_timeout_s
        self.runtimes: dict[str, Served] = {}
        self.install_errors: dict[str, str] = {}
        self.draining: list[Served] = []
        self._lock = anyio.Lock()

    def ready_models(self) -> tuple[str, ...]:
        """Names of the models whose Runtime is ready."""
        return tuple(sorted(n for n, s in self.runtimes.items()
                            if s.supervisor.state == "ready"))

    def supervisor(self, name: str) -> RuntimeSupervisor | None:
        """The Runtime supervisor of model ``name``, or None."""
        served = self.runtimes.get(name)
        return served.supervisor if served is not None else None

    def acquire(self, name: str) -> Served | None:
        """Return the Runtime new jobs of ``name`` use, counted as in use until ``release``."""
        served = self.runtimes.get(name)
        if served is not None:
            served.users += 1
        return served

    @staticmethod
    def release(served: Served) -> None:
        """A job that ``acquire``d ``served`` has ended."""
        served.users -= 1

    def _plan(self, config: NodeConfig, entry: ModelEntry, path: Path,
              base: RuntimeSpec | None = None) -> tuple[RuntimeSpec, LoadModel]:
        base = base or self.runtime
        res, rt = config.resources, config.runtime
        limits = attrs.evolve(
            base.limits,
            # CUDA reserves far more address space than it uses: limit it on CPU only.
            max_address_space=res.max_memory_bytes if self.device == "cpu" else 0,
            max_file_size=res.max_disk_bytes,
        )
        spec = attrs.evolve(base, limits=limits,
                            threads=res.max_cpu_threads or base.threads,
                            workdir=base.workdir / entry.name.replace("/", "--"))
        load = LoadModel(entry.name, str(path), device=self.device, backend=rt.backend,
                         dtype=None if rt.dtype == "auto" else rt.dtype,
                         quantization=None if rt.quantization == "none" else rt.quantization,
                         max_num_seqs=rt.max_batch_size, max_model_len=rt.max_model_len,
                         kv_cache_bytes=rt.kv_cache_bytes or None)
        return spec, load

    def _start(self, entry: ModelEntry, spec: RuntimeSpec, load: LoadModel,
               tg: anyio.abc.TaskGroup) -> Served:
        served = Served(entry, RuntimeSupervisor(spec, load), anyio.CancelScope())
        tg.start_soon(self._run, served)
        return served

    async def apply(self, config: NodeConfig, tg: anyio.abc.TaskGroup) -> None:
        """Bring the running models in line with ``config`` (see the module docstring);
        waits (boundedly) for new Runtimes. Never raises for one bad model."""
        async with self._lock:
            await self._apply(config, tg)

    async def _apply(self, config: NodeConfig, tg: anyio.abc.TaskGroup) -> None:
        wanted = {m.name: m for m in config.models}
        started: list[RuntimeSupervisor] = []
        replacing: list[tuple[str, Served]] = []
        for name, entry in wanted.items():
            try:
                path = await anyio.to_thread.run_sync(functools.partial(
                    install_model, entry, self.source, self.install_dir,
                    progress=self.progress))
            except ModelInstallError as exc:
                self.install_errors[name] = str(exc)
                log.error("not installing %s: %s", name, exc)
                self._retire(name, "its files do not match the config", tg)
                continue
            self.install_errors.pop(name, None)
            spec, load = self._plan(config, entry, path)
            served = self.runtimes.get(name)
            if served is not None and (served.entry, served.supervisor.spec,
                                       served.supervisor.model) == (entry, spec, load):
                continue
            new = self._start(entry, spec, load, tg)
            if served is None:
                self.runtimes[name] = new
                started.append(new.supervisor)
            else:
                replacing.append((name, new))
        for name in [n for n in self.runtimes if n not in wanted]:
            self._retire(name, "it is no longer approved", tg)
        for supervisor in started:
            # Bounded: a model that loads slowly (or never) must not hold up the config hash
            # in the heartbeat; the Network learns of the model when it is ready.
            try:
                await supervisor.wait_ready(min(self.prove_timeout_s,
                                                supervisor.spec.load_timeout_s))
            except ResultityError as exc:
                log.warning("%s", exc)
        for name, new in replacing:
            try:
                await prove_runtime(new.supervisor, self.prove_timeout_s)
            except ResultityError as exc:
                new.scope.cancel()
                self.install_errors[name] = f"the new runtime failed, keeping the old: {exc}"
                log.error("%s: %s", name, self.install_errors[name])
                continue
            self._switch(name, new, tg, "replaced by its new version or settings")

    async def switch_runtime(self, base: RuntimeSpec, config: NodeConfig,
                             tg: anyio.abc.TaskGroup) -> None:
        """Move every model to Runtimes built from ``base`` (module docstring).

        Raises RuntimeFailedError, with the old Runtimes still serving, when any new one does
        not prove itself.
        """
        async with self._lock:
            fresh: dict[str, Served] = {}
            for name, served in self.runtimes.items():
                path = Path(served.supervisor.model.path) if served.supervisor.model else \
                    installed_path(self.install_dir, served.entry)
                spec, load = self._plan(config, served.entry, path, base)
                fresh[name] = self._start(served.entry, spec, load, tg)
            try:
                async with anyio.create_task_group() as checks:
                    for new in fresh.values():
                        checks.start_soon(prove_runtime, new.supervisor, self.prove_timeout_s)
            except BaseExceptionGroup as group:
                for new in fresh.values():
                    new.scope.cancel()
                reasons = "; ".join(str(e) for e in group.exceptions)
                raise RuntimeFailedError(f"the new runtime failed: {reasons}") from None
            self.runtime = base
            for name, new in fresh.items():
                self._switch(name, new, tg, "the runtime was updated")

    def _switch(self, name: str, new: Served, tg: anyio.abc.TaskGroup, why: str) -> None:
        old = self.runtimes.get(name)
        self.runtimes[name] = new
        if old is not None:
            tg.start_soon(self._drain, old, why,
                          old.entry.version != new.entry.version)

    def _retire(self, name: str, why: str, tg: anyio.abc.TaskGroup) -> None:
        served = self.runtimes.pop(name, None)
        if served is not None:
            tg.start_soon(self._drain, served, why, True)

    async def _drain(self, served: Served, why: str, remove_files: bool) -> None:
        log.info("draining the runtime of %s (%s): %d job(s) in flight", served.entry.name,
                 why, served.users)
        self.draining.append(served)
        try:
            with anyio.move_on_after(self.drain_timeout_s):
                while served.users > 0 or served.supervisor.active_jobs > 0:
                    await anyio.sleep(0.05)
            served.scope.cancel()
        finally:
            self.draining.remove(served)
        if remove_files and not any(s.entry == served.entry for s in self.runtimes.values()):
            path = installed_path(self.install_dir, served.entry)
            await anyio.to_thread.run_sync(functools.partial(
                shutil.rmtree, path, ignore_errors=True))
            log.info("removed %s version %s", served.entry.name, served.entry.version)

    @staticmethod
    async def _run(served: Served) -> None:
        with served.scope:
            await served.supervisor.run()
