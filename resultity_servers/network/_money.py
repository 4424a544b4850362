"""Prices and ledger steps inside a store transaction (the arithmetic is resultity_core's)."""

from __future__ import annotations

import attrs

from resultity_core import (
    PLATFORM_ACCOUNT,
    Price,
    Settlement,
    credit,
    release,
    reserve,
    settle,
)

from ._records import JobRecord, LedgerEntry
from ._store import StoreTx

__all__ = ["job_cost", "ledger_credit", "ledger_release", "ledger_reserve", "ledger_settle"]


def job_cost(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    """Return the micro-credits ``prompt_tokens`` and ``completion_tokens`` cost, rounded up.

    ``price`` is per 1,000 tokens; the rounding is applied once to the sum, so a job never costs
    more than one micro-credit above the exact price.
    """
    exact_milli = prompt_tokens * price.prompt_per_1k + completion_tokens * price.completion_per_1k
    return -(-exact_milli // 1000)


def ledger_credit(tx: StoreTx, account_id: str, amount: int, now: float) -> None:
    """Mint ``amount`` into ``account_id``; raises UnknownAccountError, InvalidAmountError."""
    before = tx.ledger_state([account_id], [])
    tx.ledger_update(before, credit(before, account_id, amount))
    tx.add_entry(LedgerEntry(now, "credit", account_id, amount))


def ledger_reserve(tx: StoreTx, job_id: str, account_id: str, amount: int, now: float) -> None:
    """Hold ``amount`` of ``account_id`` for ``job_id``; raises InsufficientCreditsError."""
    before = tx.ledger_state([account_id], [])
    tx.ledger_update(before, reserve(before, job_id, account_id, amount))
    tx.add_entry(LedgerEntry(now, "reserve", account_id, -amount, job_id))


def ledger_release(tx: StoreTx, job: JobRecord, now: float) -> JobRecord:
    """Return the whole reservation of ``job`` to its account; returns the settled job."""
    before = tx.ledger_state([job.account_id], [job.job_id])
    tx.ledger_update(before, release(before, job.job_id))
    tx.add_entry(LedgerEntry(now, "release", job.account_id, job.reserved, job.job_id))
    return attrs.evolve(job, settled=True, charge=0)


def ledger_settle(
    tx: StoreTx,
    job: JobRecord,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    payee_account: str,
    payee_share_bps: int,
    now: float,
) -> tuple[JobRecord, Settlement]:
    """Charge ``job``'s account for the tokens (capped at the reservation), pay the payee its
    share, the platform the rest, refund the remainder. Returns the settled job and split."""
    charge = job_cost(job.price, prompt_tokens, completion_tokens)
    before = tx.ledger_state([job.account_id, payee_account, PLATFORM_ACCOUNT], [job.job_id])
    after, s = settle(
        before, job.job_id, charge, payee_account,
        payee_share_bps=payee_share_bps, cap_to_reservation=True,
    )
    tx.ledger_update(before, after)
    for kind, account, amount in (
        ("refund", s.payer, s.refunded),
        ("earn", s.payee, s.payee_amount),
        ("fee", s.platform, s.platform_amount),
    ):
        if amount:
            tx.add_entry(LedgerEntry(now, kind, account, amount, job.job_id))
    return attrs.evolve(job, settled=True, charge=s.payer_charge), s
