"""Receipts: a node's signed usage record of one job settles the job's credits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from resultity_core import (
    Envelope,
    JobAction,
    JobEvent,
    JobState,
    JobUsage,
    PayloadFormatError,
    PublicKey,
    ResultityError,
    apply_job_action,
    canonical_digest,
    verify_receipt,
)

from ._errors import ReceiptConflictError, ReceiptError, UnknownJobError
from ._jobs import JobDesk
from ._money import ledger_settle
from ._records import JobRecord, ReceiptRecord

__all__ = ["ReceiptDesk", "ReceiptOutcome"]


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


class ReceiptDesk(JobDesk):
    """Verifying receipts and settling jobs from them."""

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
