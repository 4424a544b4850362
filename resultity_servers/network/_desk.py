"""The coordinator's shared state and the steps every part of it takes.

A job's output lives in memory (``JobStream``): token events are forwarded, not written to disk;
the store is written only when a job changes state (lease, first token, finish, failure), so a
token costs no disk write. ``DeskBase`` holds that memory, routes queued jobs to nodes, and
ends jobs (fail or cancel: charge what streamed, tell the node, emit the error event).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from resultity_core import (
    PLATFORM_ACCOUNT,
    JobAction,
    JobEvent,
    JobState,
    JobUsage,
    Lease,
    NodeConfig,
    NodeState,
    apply_job_action,
)

from ._errors import NodeAuthError
from ._money import ledger_release, ledger_settle
from ._records import JobRecord, NodeRecord
from ._settings import CoordinatorSettings
from ._store import ACTIVE_JOB_STATES, Store, StoreTx

__all__ = ["TERMINAL", "DeskBase", "JobStream", "ParkedLease", "n_choices"]

TERMINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})


class JobStream:
    """A job's output as seen by the Network (memory only)."""

    def __init__(self, account_id: str) -> None:
        self.account_id = account_id
        self.events: list[JobEvent] = []
        self.next_seq = 0
        self.completion_tokens = 0
        self.done_indexes: set[int] = set()
        self.usage: JobUsage | None = None
        self.finished_at: float | None = None
        self.delivered_at: float | None = None  # a reader had every event, [DONE] included
        # Set when the Network itself ended the job (not the node): why, for the Cloud.
        self.error_code: str | None = None

    def reset(self) -> None:
        self.next_seq = 0
        self.completion_tokens = 0
        self.done_indexes.clear()
        self.usage = None

    def push(self, event: JobEvent) -> None:
        self.events.append(attrs.evolve(event, seq=len(self.events)))


class ParkedLease:
    """A node's lease long poll waiting for work, and the leases handed to it meanwhile."""

    def __init__(self, node_id: str, max_jobs: int) -> None:
        self.node_id = node_id
        self.max_jobs = max_jobs
        self.leases: list[Lease] = []


def n_choices(request: Mapping[str, Any]) -> int:
    """Return the request's ``n`` (``sampling.n`` in the lease form) when it is a positive
    integer, else 1."""
    sampling = request.get("sampling")
    n = sampling.get("n", 1) if isinstance(sampling, Mapping) else request.get("n", 1)
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1


class DeskBase:
    """State and steps shared by the job, receipt and node desks of the Coordinator."""

    def __init__(self, store: Store, settings: CoordinatorSettings) -> None:
        self._store = store
        self.settings = settings
        self._config: tuple[str, NodeConfig] | None = None
        self._streams: dict[str, JobStream] = {}
        self._pending_cancels: dict[str, set[str]] = {}
        self._woken_nodes: set[str] = set()
        self._woken_jobs: set[str] = set()
        # Lease long polls waiting for work, per node: a submitted job is leased to one of
        # them in the submit's own transaction (see ``JobDesk.park_lease``).
        self._parked: dict[str, list[ParkedLease]] = {}
        # Signs of life (heartbeats, lease polls, event posts): kept in memory so that they
        # cost no disk write; a heartbeat writes ``last_heartbeat`` only now and then.
        self._last_seen: dict[str, float] = {}

    # --- wake-ups for the I/O driver ----------------------------------------------------------

    def take_wakeups(self) -> tuple[set[str], set[str]]:
        """Return and clear ``(node ids with new work, job ids with new events)``."""
        nodes, jobs = self._woken_nodes, self._woken_jobs
        self._woken_nodes, self._woken_jobs = set(), set()
        return nodes, jobs

    # --- helpers ------------------------------------------------------------------------------

    def _stream(self, job: JobRecord) -> JobStream:
        stream = self._streams.get(job.job_id)
        if stream is None:
            stream = self._streams[job.job_id] = JobStream(job.account_id)
        return stream

    def _emit_error(self, job: JobRecord, message: str, code: str, now: float) -> None:
        stream = self._stream(job)
        stream.error_code = code
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
        self, tx: StoreTx, job: JobRecord, action: JobAction, message: str, *, code: str,
        now: float,
    ) -> JobRecord:
        """Fail or cancel ``job``: charge what streamed, tell its node, emit the error event
        (``code``: ``no_capacity``, ``node_failed``, ``timeout`` or ``cancelled``)."""
        was = job.state
        job = attrs.evolve(job, state=apply_job_action(job.state, action), finished_at=now,
                           error=message, deadline=None)
        job = ledger_release(tx, job, now) if was == JobState.QUEUED else self._charge_produced(
            tx, job, now)
        tx.update_job(job)
        if job.node_id is not None and was in (JobState.LEASED, JobState.STREAMING):
            self._pending_cancels.setdefault(job.node_id, set()).add(job.job_id)
        self._emit_error(job, message, code, now)
        return job

    def _dispatch(self, tx: StoreTx, nodes: Sequence[NodeRecord] | None = None) -> None:
        """Assign unassigned queued jobs to the least loaded ready node with the model
        (``nodes``: every node's record, when the caller has just read them)."""
        nodes = [n for n in (tx.list_nodes() if nodes is None else nodes)
                 if n.state == NodeState.READY]
        if not nodes:
            return
        load = tx.active_job_counts()
        # Every node full (the usual case under load): nothing can move, so skip reading
        # (and decoding) the whole queue, which this runs for on every submit and lease.
        if all(load.get(n.node_id, 0) >= self._capacity(n) for n in nodes):
            return
        queued = tx.list_jobs([JobState.QUEUED], unassigned=True)
        for job in queued:
            best = self._best_node(job.model, nodes, load)
            if best is not None:
                tx.update_job(attrs.evolve(job, node_id=best.node_id))
                load[best.node_id] = load.get(best.node_id, 0) + 1
                self._woken_nodes.add(best.node_id)

    def _best_node(
        self, model: str, ready: Sequence[NodeRecord], load: Mapping[str, int]
    ) -> NodeRecord | None:
        """Return the least loaded of the ``ready`` nodes with ``model`` and room (ties: the
        lowest node id), or None."""
        best: NodeRecord | None = None
        for node in ready:
            used = load.get(node.node_id, 0)
            if model not in node.capabilities.models or used >= self._capacity(node):
                continue
            if best is None or (used, node.node_id) < (load.get(best.node_id, 0), best.node_id):
                best = node
        return best

    def _unassign_queued(self, tx: StoreTx, node_id: str) -> bool:
        """Take back the jobs queued for a node that stopped taking work (they re-route);
        return whether there were any."""
        jobs = tx.list_jobs([JobState.QUEUED], node_id=node_id)
        for job in jobs:
            tx.update_job(attrs.evolve(job, node_id=None))
        return bool(jobs)

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
                          f"job failed on {job.attempts} node(s); last: {reason}",
                          code="no_capacity", now=now)
            else:
                produced = self._stream(job).completion_tokens
                self._end(tx, job, JobAction.FAIL,
                          f"the node serving this job failed mid-stream after {produced} "
                          f"token(s): {reason}", code="node_failed", now=now)
        self._pending_cancels.pop(node.node_id, None)

    def _live_node(self, tx: StoreTx, node_id: str) -> NodeRecord:
        """Return the node; raises NodeAuthError when it is unknown or dead."""
        node = tx.get_node(node_id)
        if node is None or node.state == NodeState.DEAD:
            raise NodeAuthError(f"node {node_id[:12]} is not registered or is dead")
        return node
