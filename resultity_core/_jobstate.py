"""The lives of a job and of a node, as transition tables (data, not code paths).

Like h11's ``_state.py``: each machine is one table ``(state, event) -> next state``; anything
not in the table is refused with ``InvalidTransitionError``. The Network applies these to its
stored rows so that, for example, a job that already finished can never be cancelled and
charged twice, and a node that is draining is never leased new work.

Job life::

    queued --lease--> leased --first_token--> streaming --token--> streaming
    leased --requeue--> queued            (node died before its first token: retry elsewhere)
    leased|streaming --finish--> done     (leased -> done: finished with no output tokens)
    queued|leased|streaming --fail--> failed
    queued|leased|streaming --cancel--> cancelled
    done, failed, cancelled are terminal.

Node life::

    registering --admitted--> syncing --config_applied--> ready
    ready --config_changed--> syncing     (a new snapshot must be applied before more work)
    syncing --config_applied--> ready; ready|syncing --heartbeat--> same state
    ready|syncing --drain--> draining --resume--> ready; draining --heartbeat--> draining
    registering --rejected--> dead; any live state --timeout|shutdown--> dead
    dead --register--> registering        (a node that comes back must be admitted again)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs

from ._errors import InvalidTransitionError

__all__ = [
    "JOB_MACHINE",
    "NODE_MACHINE",
    "JobAction",
    "JobState",
    "NodeAction",
    "NodeState",
    "TransitionTable",
    "apply_job_action",
    "apply_node_action",
]


class JobState(enum.StrEnum):
    QUEUED = "queued"
    LEASED = "leased"
    STREAMING = "streaming"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobAction(enum.StrEnum):
    LEASE = "lease"
    REQUEUE = "requeue"
    FIRST_TOKEN = "first_token"
    TOKEN = "token"
    FINISH = "finish"
    FAIL = "fail"
    CANCEL = "cancel"


class NodeState(enum.StrEnum):
    REGISTERING = "registering"
    SYNCING = "syncing"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"


class NodeAction(enum.StrEnum):
    ADMITTED = "admitted"
    REJECTED = "rejected"
    CONFIG_APPLIED = "config_applied"
    CONFIG_CHANGED = "config_changed"
    HEARTBEAT = "heartbeat"
    DRAIN = "drain"
    RESUME = "resume"
    TIMEOUT = "timeout"
    SHUTDOWN = "shutdown"
    REGISTER = "register"


def _freeze_table(table: Mapping[Any, Any]) -> Mapping[tuple[str, str], str]:
    # Any: the tables are written with enum members, which are str subclasses.
    return MappingProxyType({(str(src), str(ev)): str(dst) for (src, ev), dst in table.items()})


@attrs.frozen
class TransitionTable:
    """One state machine: ``transitions[(state, event)]`` is the next state.

    ``terminal`` lists states with no way out; ``states`` and ``events`` are every member, so
    tests can enumerate the full product and check that everything absent is refused.
    """

    name: str
    states: tuple[str, ...]
    events: tuple[str, ...]
    transitions: Mapping[tuple[str, str], str] = attrs.field(converter=_freeze_table)

    @property
    def terminal(self) -> frozenset[str]:
        """Return the states from which no event leads anywhere."""
        sources = {state for state, _ in self.transitions}
        return frozenset(s for s in self.states if s not in sources)

    def allowed(self, state: str) -> frozenset[str]:
        """Return the events accepted in ``state``."""
        return frozenset(event for (src, event) in self.transitions if src == state)

    def apply(self, state: str, event: str) -> str:
        """Return the state after ``event``; raises InvalidTransitionError if not allowed."""
        try:
            return self.transitions[(state, event)]
        except KeyError:
            raise InvalidTransitionError(self.name, str(state), str(event)) from None


_J = JobState
_JA = JobAction

JOB_MACHINE = TransitionTable(
    name="job",
    states=tuple(JobState),
    events=tuple(JobAction),
    transitions={
        (_J.QUEUED, _JA.LEASE): _J.LEASED,
        (_J.QUEUED, _JA.FAIL): _J.FAILED,
        (_J.QUEUED, _JA.CANCEL): _J.CANCELLED,
        (_J.LEASED, _JA.REQUEUE): _J.QUEUED,
        (_J.LEASED, _JA.FIRST_TOKEN): _J.STREAMING,
        (_J.LEASED, _JA.FINISH): _J.DONE,
        (_J.LEASED, _JA.FAIL): _J.FAILED,
        (_J.LEASED, _JA.CANCEL): _J.CANCELLED,
        (_J.STREAMING, _JA.TOKEN): _J.STREAMING,
        (_J.STREAMING, _JA.FINISH): _J.DONE,
        (_J.STREAMING, _JA.FAIL): _J.FAILED,
        (_J.STREAMING, _JA.CANCEL): _J.CANCELLED,
    },
)

_N = NodeState
_NA = NodeAction

NODE_MACHINE = TransitionTable(
    name="node",
    states=tuple(NodeState),
    events=tuple(NodeAction),
    transitions={
        (_N.REGISTERING, _NA.ADMITTED): _N.SYNCING,
        (_N.REGISTERING, _NA.REJECTED): _N.DEAD,
        (_N.REGISTERING, _NA.TIMEOUT): _N.DEAD,
        (_N.REGISTERING, _NA.SHUTDOWN): _N.DEAD,
        (_N.SYNCING, _NA.CONFIG_APPLIED): _N.READY,
        (_N.SYNCING, _NA.HEARTBEAT): _N.SYNCING,
        (_N.SYNCING, _NA.DRAIN): _N.DRAINING,
        (_N.SYNCING, _NA.TIMEOUT): _N.DEAD,
        (_N.SYNCING, _NA.SHUTDOWN): _N.DEAD,
        (_N.READY, _NA.CONFIG_CHANGED): _N.SYNCING,
        (_N.READY, _NA.HEARTBEAT): _N.READY,
        (_N.READY, _NA.DRAIN): _N.DRAINING,
        (_N.READY, _NA.TIMEOUT): _N.DEAD,
        (_N.READY, _NA.SHUTDOWN): _N.DEAD,
        (_N.DRAINING, _NA.RESUME): _N.READY,
        (_N.DRAINING, _NA.HEARTBEAT): _N.DRAINING,
        (_N.DRAINING, _NA.TIMEOUT): _N.DEAD,
        (_N.DRAINING, _NA.SHUTDOWN): _N.DEAD,
        (_N.DEAD, _NA.REGISTER): _N.REGISTERING,
    },
)


def apply_job_action(state: JobState | str, action: JobAction | str) -> JobState:
    """Return the job's next state; raises InvalidTransitionError if ``action`` is refused."""
    return JobState(JOB_MACHINE.apply(str(state), str(action)))


def apply_node_action(state: NodeState | str, action: NodeAction | str) -> NodeState:
    """Return the node's next state; raises InvalidTransitionError if ``action`` is refused."""
    return NodeState(NODE_MACHINE.apply(str(state), str(action)))
