"""Running one leased job on a Runtime: events out, a signed Receipt at the end.

Events for the Network (core ``JobEvent``), numbered from 0 per job: ``token`` events as the
Runtime produces text, then one ``done`` per choice (each with the job's whole usage, sent
once every choice has finished), or one ``error``. A job the Network cancelled sends nothing
more; its Receipt still counts the tokens produced. Every job that reached a Runtime ends with
a Receipt signed by the node key (``request_hash`` of the lease request, ``output_hash`` of
the choices' texts and finish reasons: see ``_jobspec``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import anyio
import attrs

from resultity_core import (
    JobEvent,
    JobUsage,
    Lease,
    Receipt,
    ReceiptSubmit,
    SecretKey,
    sign_receipt,
)

from ._errors import JobSpecError, RuntimeJobError
from ._frames import Generate
from ._jobspec import JobSpec, job_output_hash, job_request_hash, parse_job_request
from ._supervisor import RuntimeSupervisor

__all__ = ["ActiveJob", "run_job"]

log = logging.getLogger("resultity.node.jobs")
Emit = Callable[[JobEvent | ReceiptSubmit], None]


@attrs.define(eq=False)
class ActiveJob:
    """A leased job while it runs: what was produced so far and how it ended."""

    lease: Lease
    cancelled: bool = False
    runtime_ids: list[str] = attrs.field(factory=list)
    seq: int = 0
    texts: list[str] = attrs.field(factory=list)
    finish: list[str | None] = attrs.field(factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    receipt: Receipt | None = None
    #: set once every frame of the job was written to the Runtime, or the job ended
    handed: anyio.Event = attrs.field(factory=anyio.Event)
    unsent: int = 0

    def event(self, kind: str, **fields: Any) -> JobEvent:
        """Return the next event of this job (``seq`` counts up from 0)."""
        event = JobEvent(self.lease.job_id, self.seq, kind, **fields)
        self.seq += 1
        return event


async def _stream(job: ActiveJob, runtime: RuntimeSupervisor, frame: Generate, *, base: int,
                  emit: Emit, scope: anyio.CancelScope) -> None:
    if job.cancelled:
        return
    aborted = False
    try:
        async for ev in runtime.generate(frame, on_sent=functools.partial(_sent, job)):
            if job.cancelled and not aborted:
                # A cancel that raced the start of the request: abort it now.
                aborted = True
                await runtime.abort(frame.job_id)
            index = base + ev.index
            if ev.text or ev.token_ids:
                job.texts[index] += ev.text
                job.completion_tokens += len(ev.token_ids)
                if not job.cancelled:
                    emit(job.event("token", index=index, text=ev.text,
                                   token_ids=tuple(ev.token_ids),
                                   logprobs=tuple(ev.logprobs) if ev.logprobs else None))
            if ev.finish_reason is not None:
                job.finish[index] = ev.finish_reason
            if ev.usage is not None:
                job.prompt_tokens += ev.usage["prompt_tokens"]
    except RuntimeJobError as exc:
        job.error = exc.reason
        scope.cancel()


def _sent(job: ActiveJob) -> None:
    job.unsent -= 1
    if job.unsent <= 0:
        job.handed.set()


async def run_job(
    job: ActiveJob, runtime: RuntimeSupervisor | None, *, key: SecretKey, emit: Emit,
    clock: Callable[[], float],
) -> None:
    """Run ``job`` on ``runtime`` until it finishes, fails, is cancelled or passes its
    deadline; emit its events and its Receipt through ``emit``. Never raises for a bad job.
    ``job.handed`` is set once its frames are written to the Runtime (or it ended).
    """
    try:
        await _run_job(job, runtime, key=key, emit=emit, clock=clock)
    finally:
        job.handed.set()


async def _run_job(
    job: ActiveJob, runtime: RuntimeSupervisor | None, *, key: SecretKey, emit: Emit,
    clock: Callable[[], float],
) -> None:
    lease = job.lease
    try:
        spec = parse_job_request(lease.request)
    except JobSpecError as exc:
        emit(job.event("error", error=f"bad request: {exc}"))
        return
    if runtime is None:
        emit(job.event("error", error=f"model {lease.model!r} is not served by this node"))
        return
    job.texts = [""] * spec.choices
    job.finish = [None] * spec.choices
    with anyio.move_on_after(lease.deadline_ms / 1000 - clock()) as deadline:
        await _run(job, spec, runtime, emit)
    if deadline.cancelled_caught and job.error is None:
        job.error = "the job passed its deadline"
    if job.error is not None:
        if not job.cancelled:
            emit(job.event("error", error=job.error))
    elif not job.cancelled:
        usage = JobUsage(job.prompt_tokens, job.completion_tokens)
        for index, reason in enumerate(job.finish):
            emit(job.event("done", index=index, finish_reason=_wire_finish(reason),
                           usage=usage))
    job.receipt = Receipt(
        job_id=lease.job_id, node_id=key.keyid, model=lease.model,
        request_hash=job_request_hash(lease.request),
        output_hash=job_output_hash(job.texts, job.finish),
        prompt_tokens=job.prompt_tokens, completion_tokens=job.completion_tokens,
        issued_at=int(clock()),
    )
    emit(ReceiptSubmit(dict(sign_receipt(job.receipt, key).to_payload())))


def _wire_finish(reason: str | None) -> str:
    # The Runtime ends a choice with stop, length or abort; an abort we did not ask for
    # (the Runtime shutting down) is reported as a stop, the text being complete so far.
    return reason if reason in ("stop", "length") else "stop"


async def _run(job: ActiveJob, spec: JobSpec, runtime: RuntimeSupervisor, emit: Emit) -> None:
    prompts: tuple[str | None, ...] = spec.prompts or (None,)
    job.unsent = len(prompts)
    messages = [dict(m) for m in spec.messages] if spec.messages is not None else None
    if len(prompts) == 1:
        # One Runtime request (chat, or one prompt): streamed in this task, which saves a
        # task start on the way to the Runtime.
        job.runtime_ids.append(job.lease.job_id)
        frame = Generate(job.lease.job_id, prompts[0], messages if prompts[0] is None else None,
                         spec.sampling)
        with anyio.CancelScope() as scope:
            await _stream(job, runtime, frame, base=0, emit=emit, scope=scope)
        return
    async with anyio.create_task_group() as tg:
        for i, prompt in enumerate(prompts):
            runtime_id = f"{job.lease.job_id}.p{i}"
            job.runtime_ids.append(runtime_id)
            frame = Generate(runtime_id, prompt, messages if prompt is None else None,
                             spec.sampling)
            tg.start_soon(functools.partial(_stream, job, runtime, frame, base=i * spec.n,
                                            emit=emit, scope=tg.cancel_scope))
