"""The Agent's models: install what a NodeConfig approves and run one Runtime child per model.

``Fleet.apply(config, task_group)`` stops the Runtime of every model that is no longer
approved, or whose entry, engine settings or limits changed, then installs (sha256 and size
checked, in a worker thread) and starts a ``RuntimeSupervisor`` for each approved model not
running. The Runtime's limits come from the config's ``resources``; its engine settings from
``runtime``.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import anyio
import anyio.abc
import attrs

from resultity_core import ModelEntry, NodeConfig, ResultityError

from ._errors import ModelInstallError
from ._frames import LoadModel
from ._models import ModelSource, Progress, install_model
from ._supervisor import RuntimeSpec, RuntimeSupervisor

__all__ = ["Fleet", "Served"]

log = logging.getLogger("resultity.node")
READY_WAIT_S = 30.0


@attrs.define(eq=False)
class Served:
    """One approved model, its Runtime supervisor and the scope that stops it."""

    entry: ModelEntry
    supervisor: RuntimeSupervisor
    scope: anyio.CancelScope


class Fleet:
    """The models a node serves (``runtimes``) and why others are not (``install_errors``)."""

    def __init__(self, *, source: ModelSource, install_dir: Path, runtime: RuntimeSpec,
                 device: str, progress: Progress | None) -> None:
        self.source = source
        self.install_dir = install_dir
        self.runtime = runtime
        self.device = device
        self.progress = progress
        self.runtimes: dict[str, Served] = {}
        self.install_errors: dict[str, str] = {}

    def ready_models(self) -> tuple[str, ...]:
        """Names of the models whose Runtime is ready."""
        return tuple(sorted(n for n, s in self.runtimes.items()
                            if s.supervisor.state == "ready"))

    def supervisor(self, name: str) -> RuntimeSupervisor | None:
        """The Runtime supervisor of model ``name``, or None."""
        served = self.runtimes.get(name)
        return served.supervisor if served is not None else None

    def _plan(self, config: NodeConfig, entry: ModelEntry, path: Path
              ) -> tuple[RuntimeSpec, LoadModel]:
        res, rt = config.resources, config.runtime
        limits = attrs.evolve(
            self.runtime.limits,
            # CUDA reserves far more address space than it uses: limit it on CPU only.
            max_address_space=res.max_memory_bytes if self.device == "cpu" else 0,
            max_file_size=res.max_disk_bytes,
        )
        spec = attrs.evolve(self.runtime, limits=limits,
                            threads=res.max_cpu_threads or self.runtime.threads,
                            workdir=self.runtime.workdir / entry.name.replace("/", "--"))
        load = LoadModel(entry.name, str(path), device=self.device, backend=rt.backend,
                         max_num_seqs=rt.max_batch_size, max_model_len=rt.max_model_len,
                         kv_cache_bytes=rt.kv_cache_bytes or None)
        return spec, load

    async def apply(self, config: NodeConfig, tg: anyio.abc.TaskGroup) -> None:
        """Bring the running models in line with ``config`` (see the module docstring);
        waits (boundedly) for new Runtimes to be ready. Never raises for one bad model."""
        wanted = {m.name: m for m in config.models}
        started: list[RuntimeSupervisor] = []
        for name, entry in wanted.items():
            try:
                path = await anyio.to_thread.run_sync(functools.partial(
                    install_model, entry, self.source, self.install_dir,
                    progress=self.progress))
            except ModelInstallError as exc:
                self.install_errors[name] = str(exc)
                log.error("not installing %s: %s", name, exc)
                self._stop(name, "its files do not match the config")
                continue
            self.install_errors.pop(name, None)
            spec, load = self._plan(config, entry, path)
            served = self.runtimes.get(name)
            if served is not None and (served.entry, served.supervisor.spec,
                                       served.supervisor.model) == (entry, spec, load):
                continue
            self._stop(name, "its entry or settings changed")
            served = Served(entry, RuntimeSupervisor(spec, load), anyio.CancelScope())
            self.runtimes[name] = served
            tg.start_soon(self._run, served)
            started.append(served.supervisor)
        for name in [n for n in self.runtimes if n not in wanted]:
            self._stop(name, "it is no longer approved")
        for supervisor in started:
            # Bounded: a model that loads slowly (or never) must not hold up the config hash
            # in the heartbeat; the Network learns of the model when it is ready.
            try:
                await supervisor.wait_ready(min(READY_WAIT_S, supervisor.spec.load_timeout_s))
            except ResultityError as exc:
                log.warning("%s", exc)

    def _stop(self, name: str, why: str) -> None:
        served = self.runtimes.pop(name, None)
        if served is not None:
            log.info("stopping the runtime of %s: %s", name, why)
            served.scope.cancel()

    @staticmethod
    async def _run(served: Served) -> None:
        with served.scope:
            await served.supervisor.run()
