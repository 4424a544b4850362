"""The coordinator's job desk: submit, route, lease, stream events, cancel, settle receipts.

Job states follow ``resultity_core.JOB_MACHINE``; every change goes through
``apply_job_action`` so a finished job can never be cancelled or charged twice. The output of
a job lives in memory (``JobStream``): token events are forwarded, not written to disk; the store
is written only when the job changes state (lease, first token, finish, failure), so a token
costs no disk write. A node's events carry ``seq`` from 0; duplicates are dropped, gaps refused.
Events handed to the Cloud are renumbered from 0 in the order the Network accepted them.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from resultity_core import (
    CanonicalEncodingError,
    InsufficientCreditsError,
    InvalidAPIKeyError,
    InvalidRequestError,
    JobAction,
    JobEvent,
    JobState,
    JobUsage,
    Lease,
    LeaseBatch,
    NodeState,
    ResultityError,
    apply_job_action,
    canonical_bytes,
    insufficient_quota,
    model_not_found,
    no_capacity,
)

from ._desk import TERMINAL, DeskBase, JobStream, ParkedLease, n_choices
from ._errors import JobStateError, UnknownJobError
from ._money import job_cost, ledger_reserve
from ._records import JobRecord
from ._store import StoreTx

__all__ = ["JobDesk", "JobEventsView"]


@attrs.frozen
class JobEventsView:
    """Events of a job from index ``after`` on; ``finished`` once a done/error event is in.

    ``error_code`` is set when the Network ended the job itself (``no_capacity``,
    ``node_failed``, ``timeout``, ``cancelled``); a node-reported error leaves it None.
    """

    job_id: str
    events: tuple[JobEvent, ...]
    finished: bool
    next_index: int
    error_code: str | None = None


class JobDesk(DeskBase):
    """Submitting, leasing, streaming and cancelling jobs."""

    def submit_job(
        self,
        account_id: str,
        model: str,
        request: Mapping[str, Any],
        *,
        now: float,
        prompt_tokens_estimate: int = 0,
        max_tokens: int = 0,
        reserve: int | None = None,
        choices: int | None = None,
        job_id: str | None = None,
    ) -> JobRecord:
        """Queue a job after reserving its worst-case cost; returns the job record.

        The reservation is ``reserve`` micro-credits when given (the Cloud's own worst case),
        else ``job_cost(price, prompt_tokens_estimate, max_tokens)`` at the model's price in
        the current NodeConfig: ``max_tokens`` is the most completion tokens over all choices
        and ``prompt_tokens_estimate`` must not undercount (charges are capped at the
        reservation). ``choices`` is the number of ``done`` events that finish the job
        (default: ``n_choices(request)``). ``request`` is what the node is leased.

        Raises InvalidRequestError (bad numbers, a request with no canonical JSON form),
        InvalidAPIKeyError (unknown account), ModelNotFoundError (not in the current config),
        NoCapacityError (no config, or no live node has the model) and InsufficientQuotaError
        (402: balance below the reservation).
        """
        for name, value in (("prompt_tokens_estimate", prompt_tokens_estimate),
                            ("max_tokens", max_tokens), ("reserve", reserve),
                            ("choices", choices)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidRequestError(f"{name} must be a non-negative integer", param=name)
        try:
            canonical_bytes(dict(request))
        except CanonicalEncodingError as exc:
            raise InvalidRequestError(f"request: {exc}", param="request") from None
        job_id = job_id or "job-" + secrets.token_hex(12)
        if self._config is None:
            raise no_capacity(model)
        entry = self._config[1].model(model)
        if entry is None:
            raise model_not_found(model)
        with self._store.transaction() as tx:
            if tx.get_account(account_id) is None:
                raise InvalidAPIKeyError(f"unknown account {account_id!r}")
            nodes = tx.list_nodes()
            if not any(n.state in (NodeState.READY, NodeState.SYNCING)
                       and model in n.capabilities.models for n in nodes):
                raise no_capacity(model)
            reserved = reserve if reserve is not None else job_cost(
                entry.price, prompt_tokens_estimate, max_tokens)
            try:
                ledger_reserve(tx, job_id, account_id, reserved, now)
            except InsufficientCreditsError as exc:
                raise insufficient_quota(exc.requested, exc.balance) from None
            job = JobRecord(
                job_id=job_id, account_id=account_id, model=model, request=dict(request),
                state=JobState.QUEUED, created=now, max_tokens=max_tokens,
                prompt_tokens_estimate=prompt_tokens_estimate, price=entry.price,
                reserved=reserved, choices=max(1, choices or n_choices(request)),
            )
            ready = [n for n in nodes if n.state == NodeState.READY]
            if ready and not tx.list_jobs([JobState.QUEUED], unassigned=True, limit=1):
                # Nothing queued ahead of it: route it, and lease it to a parked poll, before
                # the insert, so the job is written once, as it leaves the submit.
                parked: ParkedLease | None = None
                lease: Lease | None = None
                best = self._best_node(model, ready, tx.active_job_counts())
                if best is not None:
                    self._woken_nodes.add(best.node_id)
                    job = attrs.evolve(job, node_id=best.node_id)
                    parked = self._parked_with_room(best.node_id)
                    if parked is not None:
                        job, lease = self._leased(job, now + self.settings.job_timeout_s)
                tx.insert_job(job)
                self._streams[job_id] = JobStream(account_id)
                if parked is not None and lease is not None:
                    self._last_seen[parked.node_id] = now
                    parked.leases.append(lease)
            else:
                tx.insert_job(job)
                self._streams[job_id] = JobStream(account_id)
                self._dispatch(tx, nodes)
                routed = tx.get_job(job_id)
                assert routed is not None
                job = routed
                if job.node_id is not None:
                    job = self._hand_to_parked(tx, job, now)
        return job

    def park_lease(self, node_id: str, max_jobs: int) -> ParkedLease:
        """Register a lease long poll of ``node_id`` that found no work; returns its handle.

        Until ``unpark_lease``, a job submitted and routed to that node is leased in the
        submit's own transaction and added to the handle's ``leases`` (at most ``max_jobs``),
        so the woken poll answers without a lease pass of its own.
        """
        parked = ParkedLease(node_id, max_jobs)
        self._parked.setdefault(node_id, []).append(parked)
        return parked

    def unpark_lease(self, parked: ParkedLease) -> LeaseBatch:
        """Stop handing jobs to ``parked``; returns the leases it was handed (maybe none).

        The caller answers the node with them, or puts them back with ``return_leases``.
        """
        polls = self._parked.get(parked.node_id)
        if polls is not None and parked in polls:
            polls.remove(parked)
            if not polls:
                del self._parked[parked.node_id]
        leases, parked.leases = tuple(parked.leases), []
        return LeaseBatch(leases)

    def _parked_with_room(self, node_id: str) -> ParkedLease | None:
        for parked in self._parked.get(node_id, ()):
            if len(parked.leases) < parked.max_jobs:
                return parked
        return None

    def _hand_to_parked(self, tx: StoreTx, job: JobRecord, now: float) -> JobRecord:
        """Lease a just-queued ``job`` to a parked poll of the node it was routed to, if one
        has room; returns the job as it now is."""
        parked = self._parked_with_room(job.node_id or "")
        if parked is not None:
            self._last_seen[parked.node_id] = now
            job, lease = self._lease_job(tx, job, now + self.settings.job_timeout_s)
            parked.leases.append(lease)
        return job

    def _leased(self, queued: JobRecord, deadline: float) -> tuple[JobRecord, Lease]:
        """Return ``queued`` as leased until ``deadline`` and its lease (nothing written)."""
        job = attrs.evolve(queued, state=apply_job_action(queued.state, JobAction.LEASE),
                           attempts=queued.attempts + 1, deadline=deadline)
        return job, Lease(job.job_id, job.model, dict(job.request), int(deadline * 1000))

    def _lease_job(self, tx: StoreTx, queued: JobRecord, deadline: float) -> tuple[
            JobRecord, Lease]:
        job, lease = self._leased(queued, deadline)
        tx.update_job(job)
        self._stream(job).reset()
        return job, lease

    def lease(self, node_id: str, max_jobs: int, now: float) -> LeaseBatch:
        """Lease up to ``max_jobs`` jobs assigned to a ready node; returns them (maybe none).

        Counts as a sign of life. Raises NodeAuthError for an unknown or dead node.
        """
        leases = []
        with self._store.transaction() as tx:
            node = self._live_node(tx, node_id)
            self._last_seen[node_id] = now
            if node.state != NodeState.READY:
                return LeaseBatch(())
            self._dispatch(tx)
            deadline = now + self.settings.job_timeout_s
            for queued in tx.list_jobs([JobState.QUEUED], node_id=node_id, limit=max_jobs):
                leases.append(self._lease_job(tx, queued, deadline)[1])
        return LeaseBatch(tuple(leases))

    def return_leases(self, node_id: str, job_ids: Iterable[str], now: float) -> None:
        """Put back leases that never reached the node (its long poll broke), uncounted."""
        with self._store.transaction() as tx:
            for job_id in job_ids:
                job = tx.get_job(job_id)
                if job is None or job.node_id != node_id or job.state != JobState.LEASED:
                    continue
                tx.update_job(attrs.evolve(
                    job, state=apply_job_action(job.state, JobAction.REQUEUE), node_id=None,
                    attempts=job.attempts - 1, deadline=None,
                ))
            self._dispatch(tx)

    def post_events(self, node_id: str, events: Sequence[JobEvent], now: float) -> tuple[str, ...]:
        """Accept a node's job events in order; returns job ids the node must abort.

        Duplicates (seq already seen) are dropped. Raises UnknownJobError, JobStateError (job
        not leased to this node, or a gap in seq): events before the bad one are kept.
        """
        cancel = set(self._pending_cancels.pop(node_id, set()))
        error: ResultityError | None = None
        with self._store.transaction() as tx:
            node = self._live_node(tx, node_id)
            self._last_seen[node_id] = now
            # A batch is mostly one job's tokens: read each job once, keep it as updated.
            jobs: dict[str, JobRecord | None] = {}
            for event in events:
                if event.job_id not in jobs:
                    jobs[event.job_id] = tx.get_job(event.job_id)
                job = jobs[event.job_id]
                if job is None:
                    error = UnknownJobError(f"unknown job {event.job_id!r}")
                    break
                if job.node_id != node.node_id or job.state == JobState.QUEUED:
                    error = JobStateError(f"job {job.job_id!r} is not leased to this node")
                    break
                if job.state in TERMINAL:
                    if job.state != JobState.DONE:
                        cancel.add(job.job_id)
                    continue
                stream = self._stream(job)
                if job.state == JobState.STREAMING and stream.next_seq == 0:
                    # The Network restarted mid-stream: take the node's numbering from here.
                    stream.next_seq = event.seq
                if event.seq < stream.next_seq:
                    continue
                if event.seq > stream.next_seq:
                    error = JobStateError(
                        f"job {job.job_id!r}: event seq {event.seq}, expected {stream.next_seq}")
                    break
                stream.next_seq += 1
                jobs[job.job_id] = self._apply_event(tx, job, event, stream, now)
            if any(event.kind != "token" for event in events):
                # A job may have ended and freed a slot: hand queued work to it now (waking
                # the node's lease poll) rather than at the next submit or tick.
                self._dispatch(tx)
        if error is not None:
            raise error
        return tuple(sorted(cancel))

    def _apply_event(
        self, tx: StoreTx, job: JobRecord, event: JobEvent, stream: JobStream, now: float
    ) -> JobRecord:
        """Apply one in-order event; return the job as it now is in the store."""
        self._woken_jobs.add(job.job_id)
        if event.kind == "error":
            stream.push(event)
            message = f"the node reported an error: {event.error}"
            job = attrs.evolve(job, state=apply_job_action(job.state, JobAction.FAIL),
                               finished_at=now, error=message, deadline=None)
            job = self._charge_produced(tx, job, now)
            tx.update_job(job)
            stream.finished_at = now
            return job
        if event.kind == "token":
            if job.state == JobState.LEASED:
                job = attrs.evolve(job, first_token_at=now, state=apply_job_action(
                    job.state, JobAction.FIRST_TOKEN))
                tx.update_job(job)
            stream.completion_tokens += len(event.token_ids)
            stream.push(event)
            return job
        assert event.kind == "done"
        assert event.usage is not None
        stream.push(event)
        stream.done_indexes.add(event.index)
        usage = event.usage
        if stream.usage is not None:
            usage = JobUsage(max(usage.prompt_tokens, stream.usage.prompt_tokens),
                             max(usage.completion_tokens, stream.usage.completion_tokens))
        stream.usage = usage
        if len(stream.done_indexes) >= job.choices:
            job = attrs.evolve(job, state=apply_job_action(job.state, JobAction.FINISH),
                               finished_at=now, deadline=None, prompt_tokens=usage.prompt_tokens,
                               completion_tokens=usage.completion_tokens)
            tx.update_job(job)
            stream.finished_at = now
        return job

    def job_events(
        self, job_id: str, after: int = 0, *, account_id: str | None = None
    ) -> JobEventsView:
        """Return the job's events from index ``after`` (renumbered from 0 by the Network).

        Raises UnknownJobError when the job does not exist or ``account_id`` does not own it.
        """
        stream = self._streams.get(job_id)
        if stream is None:
            with self._store.transaction() as tx:
                job = tx.get_job(job_id)
            if job is None or (account_id is not None and job.account_id != account_id):
                raise UnknownJobError(f"unknown job {job_id!r}")
            stream = self._stream(job)
            if job.state in TERMINAL:
                stream.push(JobEvent(job_id, 0, "error", error=job.error or (
                    f"job is {job.state}; its output is no longer available")))
                stream.finished_at = job.finished_at or 0.0
        elif account_id is not None and stream.account_id != account_id:
            raise UnknownJobError(f"unknown job {job_id!r}")
        events = tuple(stream.events[after:])
        return JobEventsView(job_id, events, stream.finished_at is not None,
                             max(after, len(stream.events)), stream.error_code)

    def stream_delivered(self, job_id: str, now: float) -> None:
        """Note that a reader received the whole of a finished job's stream: its events are
        then kept ``delivered_retention_s`` instead of ``event_retention_s``."""
        stream = self._streams.get(job_id)
        if stream is not None and stream.finished_at is not None and stream.delivered_at is None:
            stream.delivered_at = now

    def cancel_job(self, job_id: str, now: float, *, account_id: str | None = None) -> JobRecord:
        """Cancel a job (idempotent: a finished job is returned unchanged).

        A queued job's reservation is released; a running one is charged for the completion
        tokens streamed so far and its node is told to abort on its next events post or
        heartbeat. Raises UnknownJobError (also when ``account_id`` does not own the job).
        """
        with self._store.transaction() as tx:
            job = tx.get_job(job_id)
            if job is None or (account_id is not None and job.account_id != account_id):
                raise UnknownJobError(f"unknown job {job_id!r}")
            if job.state in TERMINAL:
                return job
            job = self._end(tx, job, JobAction.CANCEL, "the job was cancelled by the client",
                            code="cancelled", now=now)
            self._dispatch(tx)
        return job

    def get_job(self, job_id: str, *, account_id: str | None = None) -> JobRecord:
        """Return the job; raises UnknownJobError (also when ``account_id`` does not own it)."""
        with self._store.transaction() as tx:
            job = tx.get_job(job_id)
        if job is None or (account_id is not None and job.account_id != account_id):
            raise UnknownJobError(f"unknown job {job_id!r}")
        return job
