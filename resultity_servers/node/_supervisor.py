"""The Agent's side of the Runtime: start the child, watch it, restart it, route its frames.

``RuntimeSupervisor.run()`` keeps one Runtime child alive until cancelled: start it (cleared
environment, private working directory, sandbox limits), wait for ``ready``, load the model,
then serve jobs while pinging it. Whatever makes the child unusable (it exits, sends a bad or
oversize frame, misses a ``pong``, reports a fatal error, fails to load) ends in one place:
the child is killed, its jobs are settled, and it is started again after a backoff that grows
from ``backoff_initial_s`` to ``backoff_max_s`` (reset after a run that lasted a minute).

Jobs whose child dies before they produced any output are sent again to the next child (at
most ``max_job_retries`` times); the others end with a ``RuntimeJobError``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc
import attrs
from anyio.streams.memory import MemoryObjectSendStream

from ._errors import FrameError, RuntimeFailedError, RuntimeJobError
from ._frames import (
    DEFAULT_MAX_FRAME,
    Abort,
    ErrorFrame,
    FrameDecoder,
    Generate,
    LoadModel,
    ModelLoaded,
    Ping,
    Pong,
    Ready,
    RuntimeMessage,
    Shutdown,
    TokenEvent,
    encode_frame,
)
from ._sandbox import SandboxLimits, runtime_env

__all__ = ["RuntimeSpec", "RuntimeSupervisor"]

log = logging.getLogger("resultity.node.runtime")
_STABLE_S = 60.0
_OUT_MAX_FRAME = 16 << 20


@attrs.frozen
class RuntimeSpec:
    """How to run a Runtime child. ``command`` None runs ``_runtime_main`` with ``limits``.

    ``python`` is the interpreter (default ``sys.executable``): an update points it at the
    new versioned environment. A ``command`` element ``"{python}"`` is replaced by it.
    """

    workdir: Path
    command: tuple[str, ...] | None = None
    python: str | None = None
    limits: SandboxLimits = attrs.field(factory=SandboxLimits)
    threads: int = 0
    extra_env: Mapping[str, str] = attrs.field(factory=dict)
    log_path: Path | None = None
    max_frame: int = DEFAULT_MAX_FRAME
    start_timeout_s: float = 60.0
    load_timeout_s: float = 600.0
    health_interval_s: float = 5.0
    health_timeout_s: float = 30.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    max_job_retries: int = 1

    def argv(self) -> list[str]:
        """Return the child's command line."""
        python = self.python or sys.executable
        if self.command is not None:
            return [python if part == "{python}" else part for part in self.command]
        limits = self.limits
        if limits.readonly_paths:  # the working directory must stay writable
            limits = attrs.evolve(limits, writable_paths=(
                *limits.writable_paths, str(self.workdir.resolve())))
        return [python, "-m", "resultity_servers.node._runtime_main",
                *limits.to_args()]


@attrs.define(eq=False)
class _Job:
    frame: Generate
    send: MemoryObjectSendStream[TokenEvent | RuntimeJobError]
    sent: bool = False
    produced: bool = False
    attempts: int = 0


def _deliver(job: _Job, item: TokenEvent | RuntimeJobError) -> None:
    # The consumer may have gone away between our lookup and now; then nobody needs it.
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
        job.send.send_nowait(item)


class RuntimeSupervisor:
    """Keeps one Runtime child serving ``model``; run ``run()`` in a task group.

    ``state`` is ``stopped``, ``starting``, ``ready`` or ``backoff``; ``restarts`` counts
    restarts, ``last_error`` says why the last child ended (None before any ended),
    ``sandbox`` and ``version`` are what the last child reported in its ``ready`` frame.
    """

    def __init__(self, spec: RuntimeSpec, model: LoadModel | None = None) -> None:
        self.spec = spec
        self.model = model
        self.state = "stopped"
        self.restarts = 0
        self.last_error: str | None = None
        self.sandbox: dict[str, Any] = {}
        self.version: str | None = None
        self.max_seq_len: int | None = None
        self._exit_reason: str | None = None
        self._jobs: dict[str, _Job] = {}
        self._proc: anyio.abc.Process | None = None
        # fast_acquire: an uncontended write goes out at once, without first yielding to
        # every other ready task (a job's frame is on the path to its first token).
        self._write_lock = anyio.Lock(fast_acquire=True)
        self._ready = anyio.Event()
        self._got_ready: anyio.Event = anyio.Event()
        self._loaded: anyio.Event = anyio.Event()
        self._load_error: str | None = None
        self._pong = anyio.Event()
        self._pong_seq = -1

    # ---- public ---------------------------------------------------------------------------

    @property
    def active_jobs(self) -> int:
        """How many jobs are in flight (sent or waiting for a child)."""
        return len(self._jobs)

    @property
    def pid(self) -> int | None:
        """The child's process id, or None when none is running."""
        return self._proc.pid if self._proc is not None else None

    async def wait_ready(self, timeout_s: float) -> None:
        """Return once a child is ready; raises RuntimeFailedError after ``timeout_s``."""
        with anyio.move_on_after(timeout_s):
            await self._ready.wait()
            return
        raise RuntimeFailedError(
            f"runtime not ready after {timeout_s:g} s (state {self.state}, last error: "
            f"{self.last_error})"
        )

    async def run(self) -> None:
        """Run and restart the child until cancelled; on cancel, shut the child down."""
        backoff = self.spec.backoff_initial_s
        try:
            while True:
                started = anyio.current_time()
                self._set_state("starting")
                await self._run_child()
                self._settle_jobs(self.last_error or "runtime exited")
                if anyio.current_time() - started > _STABLE_S:
                    backoff = self.spec.backoff_initial_s
                self._set_state("backoff")
                log.warning("runtime stopped (%s); restarting in %.1f s", self.last_error, backoff)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, self.spec.backoff_max_s)
                self.restarts += 1
        finally:
            self._set_state("stopped")
            for job in list(self._jobs.values()):
                self._fail(job, "runtime stopped")

    async def generate(self, frame: Generate, *, on_sent: Callable[[], None] | None = None
                       ) -> AsyncIterator[TokenEvent]:
        """Yield the job's token events until its last one (the one with ``usage``).

        ``on_sent`` is called once the frame was written to the Runtime (or queued for a
        child that is not ready yet), before the first event is awaited. Leaving early aborts
        the job in the Runtime. Raises RuntimeJobError when the Runtime refuses the job or
        dies under it.
        """
        if frame.job_id in self._jobs:
            raise RuntimeJobError(frame.job_id, "job id already running")
        send, recv = anyio.create_memory_object_stream[TokenEvent | RuntimeJobError](math.inf)
        job = _Job(frame, send)
        self._jobs[frame.job_id] = job
        try:
            if self.state == "ready":
                await self._send_job(job)
            if on_sent is not None:
                on_sent()
            async with recv:
                async for item in recv:
                    if isinstance(item, RuntimeJobError):
                        raise item
                    yield item
                    if item.usage is not None:
                        return
        finally:
            if self._jobs.get(frame.job_id) is job:
                del self._jobs[frame.job_id]
                send.close()
                if job.sent:
                    with anyio.CancelScope(shield=True):
                        await self.abort(frame.job_id, force=True)

    async def abort(self, job_id: str, *, force: bool = False) -> None:
        """Ask the Runtime to cancel ``job_id``; its choices end with finish_reason abort.

        Does nothing for a job the Runtime was not sent (unless ``force``) or when no child
        is running (a restarted child does not know the job). Never raises.
        """
        job = self._jobs.get(job_id)
        if force or (job is not None and job.sent):
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError,
                                     OSError):
                await self._write(Abort(job_id))

    # ---- the child ------------------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        self.state = state
        if state == "ready":
            self._ready.set()
        elif self._ready.is_set():
            self._ready = anyio.Event()

    async def _run_child(self) -> None:
        spec = self.spec
        spec.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        env = runtime_env(spec.workdir, threads=spec.threads, extra=spec.extra_env)
        if spec.python is not None and "PYTHONPATH" not in spec.extra_env:
            # A versioned environment imports its own resultity, not the Agent's code.
            env.pop("PYTHONPATH", None)
        stderr: IO[bytes] | None = None
        if spec.log_path is not None:
            stderr = spec.log_path.open("ab")
        self._got_ready, self._loaded = anyio.Event(), anyio.Event()
        try:
            # Shielded: a cancellation inside the spawn (a node shutting down while a Runtime
            # starts) could leave the child running with nobody to stop it; once spawned, the
            # try/finally below stops it.
            with anyio.CancelScope(shield=True):
                proc = await anyio.open_process(
                    spec.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                    cwd=spec.workdir, env=env, start_new_session=True,
                )
        except OSError as exc:
            self.last_error = f"cannot start the runtime: {exc}"
            return
        finally:
            if stderr is not None:
                stderr.close()
        self._proc = proc
        self._exit_reason = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._reader, proc, tg.cancel_scope)
                await self._start(proc)
                tg.start_soon(self._health, proc)
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop(proc)
            self._proc = None
            self.last_error = self._exit_reason or f"runtime exited ({proc.returncode})"

    async def _start(self, proc: anyio.abc.Process) -> None:
        with anyio.move_on_after(self.spec.start_timeout_s):
            await self._got_ready.wait()
        if not self._got_ready.is_set():
            self._kill(proc, f"no ready frame within {self.spec.start_timeout_s:g} s")
            await anyio.sleep_forever()
        if self.model is not None:
            self._load_error = None
            try:
                await self._write(self.model)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await anyio.sleep_forever()  # the reader sees the exit and cancels us
            with anyio.move_on_after(self.spec.load_timeout_s):
                await self._loaded.wait()
            if not self._loaded.is_set() or self._load_error is not None:
                why = self._load_error or f"not loaded within {self.spec.load_timeout_s:g} s"
                self._kill(proc, f"model {self.model.name}: {why}")
                await anyio.sleep_forever()
        self._set_state("ready")
        log.info("runtime ready (pid %s, sandbox %s)", proc.pid, self.sandbox)
        for job in list(self._jobs.values()):
            if not job.sent:
                await self._send_job(job)

    async def _stop(self, proc: anyio.abc.Process) -> None:
        # Wait before killing: Popen.kill() on an exited child reaps it behind asyncio's back.
        if proc.returncode is None:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError,
                                     OSError):
                await self._write(Shutdown(), proc=proc)
            with anyio.move_on_after(2.0):
                await proc.wait()
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await proc.aclose()

    def _kill(self, proc: anyio.abc.Process, reason: str) -> None:
        if self._exit_reason is None:
            self._exit_reason = reason
        log.error("killing runtime pid %s: %s", proc.pid, reason)
        if proc.returncode is None:
            proc.kill()

    async def _reader(self, proc: anyio.abc.Process, scope: anyio.CancelScope) -> None:
        decoder = FrameDecoder(max_frame=self.spec.max_frame)
        assert proc.stdout is not None
        try:
            async for chunk in proc.stdout:
                try:
                    messages = decoder.feed(chunk)
                except FrameError as exc:
                    self._kill(proc, f"bad frame from the runtime: {exc}")
                    break
                for message in messages:
                    self._dispatch(proc, message)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            scope.cancel()

    def _dispatch(self, proc: anyio.abc.Process, m: RuntimeMessage) -> None:
        if isinstance(m, TokenEvent):
            job = self._jobs.get(m.job_id)
            if job is None:
                return  # already aborted or given up by the agent
            job.produced = job.produced or bool(m.token_ids or m.text)
            _deliver(job, m)
            if m.usage is not None:
                del self._jobs[m.job_id]
                job.send.close()
        elif isinstance(m, Pong):
            self._pong_seq = max(self._pong_seq, m.seq)
            self._pong.set()
        elif isinstance(m, ErrorFrame):
            if m.job_id is not None and m.job_id in self._jobs:
                job = self._jobs.pop(m.job_id)
                _deliver(job, RuntimeJobError(m.job_id, m.message, retryable=not job.produced))
                job.send.close()
            elif m.fatal:
                self._kill(proc, f"runtime error: {m.message}")
            elif m.job_id is None:
                self._load_error = m.message
                self._loaded.set()
        elif isinstance(m, Ready) and not self._got_ready.is_set():
            self.sandbox = dict(m.sandbox)
            self.version = m.version
            self._got_ready.set()
        elif isinstance(m, ModelLoaded) and self.model is not None and m.name == self.model.name:
            self.max_seq_len = m.max_seq_len
            self._loaded.set()
        else:
            self._kill(proc, f"unexpected {m.TYPE} frame from the runtime")

    async def _health(self, proc: anyio.abc.Process) -> None:
        seq = 0
        while True:
            await anyio.sleep(self.spec.health_interval_s)
            seq += 1
            self._pong = anyio.Event()
            try:
                await self._write(Ping(seq))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                return  # the reader sees the exit
            with anyio.move_on_after(self.spec.health_timeout_s):
                while self._pong_seq < seq:
                    await self._pong.wait()
                    self._pong = anyio.Event()
            if self._pong_seq < seq:
                self._kill(proc, f"no pong within {self.spec.health_timeout_s:g} s (hung)")
                return

    # ---- jobs -----------------------------------------------------------------------------

    async def _write(self, message: RuntimeMessage, *, proc: anyio.abc.Process | None = None
                     ) -> None:
        target = proc or self._proc
        if target is None or target.stdin is None:
            raise anyio.BrokenResourceError("no runtime is running")
        data = encode_frame(message, max_frame=_OUT_MAX_FRAME)
        async with self._write_lock:
            await target.stdin.send(data)

    async def _send_job(self, job: _Job) -> None:
        job.sent = True
        try:
            await self._write(job.frame)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            job.sent = False  # the child is gone: sent again to the next one

    def _fail(self, job: _Job, reason: str, *, retryable: bool = False) -> None:
        self._jobs.pop(job.frame.job_id, None)
        _deliver(job, RuntimeJobError(job.frame.job_id, reason, retryable=retryable))
        job.send.close()

    def _settle_jobs(self, reason: str) -> None:
        for job in list(self._jobs.values()):
            if not job.sent:
                continue
            if job.produced:
                self._fail(job, f"runtime died mid-stream: {reason}")
            elif job.attempts < self.spec.max_job_retries:
                job.attempts += 1
                job.sent = False
            else:
                self._fail(job, f"runtime died: {reason}", retryable=True)
