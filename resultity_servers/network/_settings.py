"""Settings of the coordinator (durations in seconds)."""

from __future__ import annotations

from typing import Any

import attrs

from resultity_core import BASIS_POINTS, TrustRoot

__all__ = ["CoordinatorSettings"]


def _positive(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


@attrs.frozen
class CoordinatorSettings:
    """How the coordinator times things out, retries, and splits charges.

    ``heartbeat_timeout_s``: a node silent this long (no heartbeat, no lease request) is dead.
    ``queue_timeout_s``: a job not leased this long after submission fails (reservation
    released). ``job_timeout_s``: a leased job must finish within this time of its lease (it
    fails otherwise, charged for what streamed). ``receipt_timeout_s``: a finished job
    whose receipt has not arrived by then is settled on the usage the node streamed.
    ``event_retention_s``: a finished job's events stay in memory this long, for a reader
    that reconnects (``?after=N``); ``delivered_retention_s``: this long only, once a reader
    has received the whole stream (a later reader gets an error event saying so). Memory
    under load is then bounded by a few seconds of jobs, not two minutes of them.
    ``max_attempts``: nodes a job may be leased to (a node dying before the first token
    costs one attempt). ``node_share_bps``: the node account's share of each charge in basis
    points; the platform account gets the rest. ``trust_root``: when set, published snapshots
    must pass the node rules against it (signature threshold, expiry), as nodes will check.
    """

    heartbeat_timeout_s: float = attrs.field(default=15.0, validator=_positive)
    queue_timeout_s: float = attrs.field(default=60.0, validator=_positive)
    job_timeout_s: float = attrs.field(default=600.0, validator=_positive)
    receipt_timeout_s: float = attrs.field(default=60.0, validator=_positive)
    challenge_ttl_s: float = attrs.field(default=60.0, validator=_positive)
    session_ttl_s: float = attrs.field(default=86_400.0, validator=_positive)
    event_retention_s: float = attrs.field(default=120.0, validator=_positive)
    delivered_retention_s: float = attrs.field(default=5.0, validator=_positive)
    max_attempts: int = attrs.field(default=3, validator=_positive)
    node_share_bps: int = attrs.field(
        default=8_000,
        validator=[attrs.validators.instance_of(int), attrs.validators.ge(0),
                   attrs.validators.le(BASIS_POINTS)],
    )
    max_pending_challenges: int = attrs.field(default=10_000, validator=_positive)
    trust_root: TrustRoot | None = None
