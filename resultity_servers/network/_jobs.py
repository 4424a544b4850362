"""The coordinator's job desk: submit, route, lease, stream events, cancel, settle receipts.

Job states follow ``resultity_core.JOB_MACHINE``; every change goes through
``apply_job_action`` so a finished job can never be cancelled or charged twice. The output of
a job lives in memory (``_Stream``): token events are forwarded, not written to disk; the store
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
    PLATFORM_ACCOUNT,
    CanonicalEncodingError,
    Envelope,
    InsufficientCreditsError,
    InvalidAPIKeyError,
    InvalidRequestError,
    JobAction,
    JobEvent,
    JobState,
    JobUsage,
    Lease,
    LeaseBatch,
    NodeConfig,
    NodeState,
    PayloadFormatError,
    PublicKey,
    ResultityError,
    apply_job_action,
    canonical_bytes,
    canonical_digest,
    insufficient_quota,
    model_not_found,
    no_capacity,
    verify_receipt,
)

from ._errors import JobStateError, ReceiptConflictError, ReceiptError, UnknownJobError
from ._money import job_cost, ledger_release, ledger_reserve, ledger_settle
from ._records import JobRecord, NodeRecord, ReceiptRecord
from ._settings import CoordinatorSettings
from ._store import ACTIVE_JOB_STATES, Store, StoreTx

__all__ = ["JobDesk", "JobEventsView", "ReceiptOutcome"]

TERMINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})


@attrs.frozen
class JobEventsView:
    """Events of a job from index ``after`` on; ``finished`` once a done/error event is in."""

    job_id: str
    events: tuple[JobEvent, ...]
    finished: bool
    next_index: int


@attrs.frozen
class ReceiptOutcome:
    """What a receipt did: ``charge`` is None when the job had already been settled."""

    job_id: str
    charge: int | None
    payee_account: str | None
    payee_amount: int
    platform_amount: int
    duplicate: bool = False

    def to_payload(self) -> dict[str, Any]:
        """Return the JSON form sent to the node."""
        return {"_type": "receipt_outcome", **attrs.asdict(self)}


class _Stream:
    """A job's output as seen by the Network (memory only)."""

    def __init__(self, account_id: str) -> None:
        self.account_id = account_id
        self.events: list[JobEvent] = []
        self.next_seq = 0
        self.completion_tokens = 0
        self.done_indexes: set[int] = set()
        self.usage: JobUsage | None = None
        self.finished_at: float | None = None

    def reset(self) -> None:
        self.next_seq = 0
        self.completion_tokens = 0
        self.done_indexes.clear()
        self.usage = None

    def push(self, event: JobEvent) -> None:
        self.events.append(attrs.evolve(event, seq=len(self.events)))


def n_choices(request: Mapping[str, Any]) -> int:
    """Return the request's ``n`` (``sampling.n`` in the lease form) when it is a positive
    integer, else 1."""
    sampling = request.get("sampling")
    n = sampling.get("n", 1) if isinstance(sampling, Mapping) else request.get("n", 1)
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1


class JobDesk:
    """Job handling shared by the Coordinator (see ``_coordinator``)."""

    def __init__(self, store: Store, settings: CoordinatorSettings) -> None:
        self._store = store
        self.settings = settings
        self._config: tuple[str, NodeConfig] | None = None
        self._streams: dict[str, _Stream] = {}
        self._pending_cancels: dict[str, set[str]] = {}
        self._woken_nodes: set[str] = set()
        self._woken_jobs: set[str] = set()
        # Signs of life between heartbeats (lease polls, event posts): kept in memory so that
        # a poll costs no disk write; a heartbeat writes ``last_heartbeat`` to the store.
        self._last_seen: dict[str, float] = {}

    # --- wake-ups for the I/O driver ----------------------------------------------------------

    def take_wakeups(self) -> tuple[set[str], set[str]]:
        """Return and clear ``(node ids with new work, job ids with new events)``."""
        nodes, jobs = self._woken_nodes, self._woken_jobs
        self._woken_nodes, self._woken_jobs = set(), set()
        return nodes, jobs

    # --- helpers ------------------------------------------------------------------------------

    def _stream(self, job: JobRecord) -> _Stream:
        stream = self._streams.get(job.job_id)
        if stream is None:
            stream = self._streams[job.job_id] = _Stream(job.account_id)
        return stream

    def _emit_error(self, job: JobRecord, message: str, now: float) -> None:
        stream = self._stream(job)
        stream.push(JobEvent(job.job_id, 0, "error", error=message))
        stream.finished_at = now
        self._woken_jobs.add(job.job_id)

    def _capacity(self, node: NodeRecord) -> int:
        cap = node.capabilities.max_batch
        if self._config is not None:
            cap = min(cap, self._config[1].participation.max_concurrent_jobs)
        return cap

    def _payee(self, tx: StoreTx, job: JobRecord) -> str:
        node = tx.get_node(job.node_id) if job.node_id is not None else None
        return node.account_id if node is not None else PLATFORM_ACCOUNT

    def _charge_produced(self, tx: StoreTx, job: JobRecord, now: float) -> JobRecord:
        """Settle ``job`` for the completion tokens the Network saw stream (prompt free)."""
        if job.settled:
            return job
        produced = max(self._stream(job).completion_tokens, job.completion_tokens)
        job = attrs.evolve(job, completion_tokens=produced)
        if produced == 0:
            return ledger_release(tx, job, now)
        job, _ = ledger_settle(
            tx, job, prompt_tokens=0, completion_tokens=produced,
            payee_account=self._payee(tx, job), payee_share_bps=self.settings.node_share_bps,
            now=now,
        )
        return job

    def _end(
        self, tx: StoreTx, job: JobRecord, action: JobAction, message: str, now: float
    ) -> JobRecord:
        """Fail or cancel ``job``: charge what streamed, tell its node, emit the error event."""
        was = job.state
        job = attrs.evolve(job, state=apply_job_action(job.state, action), finished_at=now,
                           error=message, deadline=None)
        job = ledger_release(tx, job, now) if was == JobState.QUEUED else self._charge_produced(
            tx, job, now)
        tx.update_job(job)
        if job.node_id is not None and was in (JobState.LEASED, JobState.STREAMING):
            self._pending_cancels.setdefault(job.node_id, set()).add(job.job_id)
        self._emit_error(job, message, now)
        return job

    def _dispatch(self, tx: StoreTx) -> None:
        """Assign unassigned queued jobs to the least loaded ready node with the model."""
        queued = tx.list_jobs([JobState.QUEUED], unassigned=True)
        if not queued:
            return
        nodes = [n for n in tx.list_nodes() if n.state == NodeState.READY]
        if not nodes:
            return
        load = tx.active_job_counts()
        for job in queued:
            best: NodeRecord | None = None
            for node in nodes:
                used = load.get(node.node_id, 0)
                if job.model not in node.capabilities.models or used >= self._capacity(node):
                    continue
                if best is None or (used, node.node_id) < (load.get(best.node_id, 0),
                                                           best.node_id):
                    best = node
            if best is not None:
                tx.update_job(attrs.evolve(job, node_id=best.node_id))
                load[best.node_id] = load.get(best.node_id, 0) + 1
                self._woken_nodes.add(best.node_id)

    def _unassign_queued(self, tx: StoreTx, node_id: str) -> None:
        """Take back the jobs queued for a node that stopped taking work (they re-route)."""
        for job in tx.list_jobs([JobState.QUEUED], node_id=node_id):
            tx.update_job(attrs.evolve(job, node_id=None))

    def _lose_node_jobs(self, tx: StoreTx, node: NodeRecord, reason: str, now: float) -> None:
        """Requeue the node's jobs that have no output yet; fail the ones mid-stream."""
        for job in tx.list_jobs(ACTIVE_JOB_STATES, node_id=node.node_id):
            if job.state == JobState.QUEUED:
                tx.update_job(attrs.evolve(job, node_id=None))
            elif job.state == JobState.LEASED and job.attempts < self.settings.max_attempts:
                tx.update_job(attrs.evolve(
                    job, state=apply_job_action(job.state, JobAction.REQUEUE), node_id=None,
                    deadline=None,
                ))
                self._stream(job).reset()
            elif job.state == JobState.LEASED:
                self._end(tx, job, JobAction.FAIL,
                          f"job failed on {job.attempts} node(s); last: {reason}", now)
            else:
                produced = self._stream(job).completion_tokens
                self._end(tx, job, JobAction.FAIL,
                          f"the node serving this job failed mid-stream after {produced} "
                          f"token(s): {reason}", now)
        self._pending_cancels.pop(node.node_id, None)

    # --- submit, lease ------------------------------------------------------------------------

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
            if not any(n.state in (NodeState.READY, NodeState.SYNCING)
                       and model in n.capabilities.models for n in tx.list_nodes()):
                raise no_capacity(model)
            reserved = reserve if reserve is not None else job_cost(
                entry.price, prompt_tokens_estimate, max_tokens)
            try:
                ledger_reserve(tx, job_id, account_id, reserved, now)
            except InsufficientCreditsError as exc:
                raise insufficient_quota(exc.requested, exc.balance) from None
            tx.insert_job(JobRecord(
                job_id=job_id, account_id=account_id, model=model, request=dict(request),
                state=JobState.QUEUED, created=now, max_tokens=max_tokens,
                prompt_tokens_estimate=prompt_tokens_estimate, price=entry.price,
                reserved=reserved, choices=max(1, choices or n_choices(request)),
            ))
            self._dispatch(tx)
            job = tx.get_job(job_id)
        assert job is not None
        self._streams[job_id] = _Stream(account_id)
        return job

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
                job = attrs.evolve(queued, state=apply_job_action(queued.state, JobAction.LEASE),
                                   attempts=queued.attempts + 1, deadline=deadline)
                tx.update_job(job)
                self._stream(job).reset()
                leases.append(Lease(job.job_id, job.model, dict(job.request),
                                    int(deadline * 1000)))
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

    def _live_node(self, tx: StoreTx, node_id: str) -> NodeRecord:
        raise NotImplementedError

    # --- events from nodes, events to the Cloud -----------------------------------------------

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
            for event in events:
                job = tx.get_job(event.job_id)
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
                self._apply_event(tx, job, event, stream, now)
        if error is not None:
            raise error
        return tuple(sorted(cancel))

    def _apply_event(
        self, tx: StoreTx, job: JobRecord, event: JobEvent, stream: _Stream, now: float
    ) -> None:
        self._woken_jobs.add(job.job_id)
        if event.kind == "error":
            stream.push(event)
            message = f"the node reported an error: {event.error}"
            job = attrs.evolve(job, state=apply_job_action(job.state, JobAction.FAIL),
                               finished_at=now, error=message, deadline=None)
            tx.update_job(self._charge_produced(tx, job, now))
            stream.finished_at = now
            return
        if event.kind == "token":
            if job.state == JobState.LEASED:
                job = attrs.evolve(job, first_token_at=now, state=apply_job_action(
                    job.state, JobAction.FIRST_TOKEN))
                tx.update_job(job)
            stream.completion_tokens += len(event.token_ids)
            stream.push(event)
            return
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
                             max(after, len(stream.events)))

    # --- cancel and receipts ------------------------------------------------------------------

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
                            now)
            self._dispatch(tx)
        return job

    def submit_receipt(
        self, node_id: str, receipt: Mapping[str, Any] | Envelope, now: float
    ) -> ReceiptOutcome:
        """Verify a node's signed receipt and settle its job (idempotent for the same receipt).

        The signature must verify against the node's registered key, the receipt's node must be
        ``node_id`` and the job's node, its model the job's model, its ``request_hash`` the
        ``canonical_digest`` of the leased request. The requester pays the receipt's tokens at
        the job's price (capped at the reservation), the node's account earns
        ``node_share_bps`` of it, the platform the rest, the remainder is refunded. A receipt
        for a job already settled (cancelled, failed, timed out) is kept but charges nothing.
        Raises ReceiptError, ReceiptConflictError (another receipt for the job), UnknownJobError.
        """
        try:
            env = receipt if isinstance(receipt, Envelope) else Envelope.from_payload(
                dict(receipt))
        except PayloadFormatError as exc:
            raise ReceiptError(f"malformed receipt envelope: {exc}") from None
        with self._store.transaction() as tx:
            node = tx.get_node(node_id)
            if node is None:
                raise ReceiptError(f"unknown node {node_id!r}")
            try:
                r = verify_receipt(env, PublicKey.from_hex(node.public_key),
                                   expected_node_id=node_id)
            except ResultityError as exc:
                raise ReceiptError(f"receipt refused: {exc}") from None
            existing = tx.get_receipt(r.job_id)
            if existing is not None:
                if existing.envelope != env.to_payload():
                    raise ReceiptConflictError(f"job {r.job_id!r} already has another receipt")
                return ReceiptOutcome(r.job_id, existing.charge, existing.payee_account,
                                      existing.payee_amount, existing.platform_amount, True)
            job = tx.get_job(r.job_id)
            if job is None:
                raise UnknownJobError(f"unknown job {r.job_id!r}")
            if job.node_id != node_id or job.state == JobState.QUEUED:
                raise ReceiptError(f"job {job.job_id!r} was not leased to this node")
            if r.model != job.model:
                raise ReceiptError(f"receipt model {r.model!r} is not the job's {job.model!r}")
            if r.request_hash != canonical_digest(job.request):
                raise ReceiptError("receipt request_hash does not match the leased request")
            record = ReceiptRecord(r.job_id, node_id, env.to_payload(), r.prompt_tokens,
                                   r.completion_tokens, now)
            if job.state in (JobState.LEASED, JobState.STREAMING):
                job = self._finish_by_receipt(job, r.prompt_tokens, r.completion_tokens, now)
            if not job.settled:
                job, s = ledger_settle(
                    tx, job, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                    payee_account=node.account_id, payee_share_bps=self.settings.node_share_bps,
                    now=now,
                )
                job = attrs.evolve(job, prompt_tokens=r.prompt_tokens,
                                   completion_tokens=r.completion_tokens)
                record = attrs.evolve(record, charge=s.payer_charge, payee_account=s.payee,
                                      payee_amount=s.payee_amount,
                                      platform_amount=s.platform_amount)
            tx.update_job(job)
            tx.insert_receipt(record)
            self._dispatch(tx)
        return ReceiptOutcome(job.job_id, record.charge, record.payee_account,
                              record.payee_amount, record.platform_amount)

    def _finish_by_receipt(
        self, job: JobRecord, prompt_tokens: int, completion_tokens: int, now: float
    ) -> JobRecord:
        """The receipt came before (or instead of) the last done event: the job is done."""
        stream = self._stream(job)
        stream.push(JobEvent(job.job_id, 0, "done", finish_reason="stop",
                             usage=JobUsage(prompt_tokens, completion_tokens)))
        stream.finished_at = now
        self._woken_jobs.add(job.job_id)
        return attrs.evolve(job, state=apply_job_action(job.state, JobAction.FINISH),
                            finished_at=now, deadline=None)

    def get_job(self, job_id: str, *, account_id: str | None = None) -> JobRecord:
        """Return the job; raises UnknownJobError (also when ``account_id`` does not own it)."""
        with self._store.transaction() as tx:
            job = tx.get_job(job_id)
        if job is None or (account_id is not None and job.account_id != account_id):
            raise UnknownJobError(f"unknown job {job_id!r}")
        return job
