"""Job and node state machines: every (state, event) pair is either the listed move or refused."""

from __future__ import annotations

import itertools

import pytest

from resultity_core._errors import InvalidTransitionError
from resultity_core._jobstate import (
    JOB_MACHINE,
    NODE_MACHINE,
    JobAction,
    JobState,
    NodeAction,
    NodeState,
    apply_job_action,
    apply_node_action,
)

J, JA, N, NA = JobState, JobAction, NodeState, NodeAction

# Written out independently of the module's table: a change there must be a change here too.
JOB_ALLOWED = {
    (J.QUEUED, JA.LEASE): J.LEASED,
    (J.QUEUED, JA.FAIL): J.FAILED,
    (J.QUEUED, JA.CANCEL): J.CANCELLED,
    (J.LEASED, JA.REQUEUE): J.QUEUED,
    (J.LEASED, JA.FIRST_TOKEN): J.STREAMING,
    (J.LEASED, JA.FINISH): J.DONE,
    (J.LEASED, JA.FAIL): J.FAILED,
    (J.LEASED, JA.CANCEL): J.CANCELLED,
    (J.STREAMING, JA.TOKEN): J.STREAMING,
    (J.STREAMING, JA.FINISH): J.DONE,
    (J.STREAMING, JA.FAIL): J.FAILED,
    (J.STREAMING, JA.CANCEL): J.CANCELLED,
}

NODE_ALLOWED = {
    (N.REGISTERING, NA.ADMITTED): N.SYNCING,
    (N.REGISTERING, NA.REJECTED): N.DEAD,
    (N.REGISTERING, NA.TIMEOUT): N.DEAD,
    (N.REGISTERING, NA.SHUTDOWN): N.DEAD,
    (N.SYNCING, NA.CONFIG_APPLIED): N.READY,
    (N.SYNCING, NA.HEARTBEAT): N.SYNCING,
    (N.SYNCING, NA.DRAIN): N.DRAINING,
    (N.SYNCING, NA.TIMEOUT): N.DEAD,
    (N.SYNCING, NA.SHUTDOWN): N.DEAD,
    (N.READY, NA.CONFIG_CHANGED): N.SYNCING,
    (N.READY, NA.HEARTBEAT): N.READY,
    (N.READY, NA.DRAIN): N.DRAINING,
    (N.READY, NA.TIMEOUT): N.DEAD,
    (N.READY, NA.SHUTDOWN): N.DEAD,
    (N.DRAINING, NA.RESUME): N.READY,
    (N.DRAINING, NA.HEARTBEAT): N.DRAINING,
    (N.DRAINING, NA.TIMEOUT): N.DEAD,
    (N.DRAINING, NA.SHUTDOWN): N.DEAD,
    (N.DEAD, NA.REGISTER): N.REGISTERING,
}


@pytest.mark.parametrize(("state", "action"), list(itertools.product(JobState, JobAction)))
def test_every_job_transition(state: JobState, action: JobAction) -> None:
    expected = JOB_ALLOWED.get((state, action))
    if expected is None:
        with pytest.raises(InvalidTransitionError) as info:
            apply_job_action(state, action)
        assert (info.value.machine, info.value.state, info.value.event) == ("job", state, action)
        assert action.value in str(info.value)
    else:
        result = apply_job_action(state, action)
        assert result is expected
        assert isinstance(result, JobState)


@pytest.mark.parametrize(("state", "action"), list(itertools.product(NodeState, NodeAction)))
def test_every_node_transition(state: NodeState, action: NodeAction) -> None:
    expected = NODE_ALLOWED.get((state, action))
    if expected is None:
        with pytest.raises(InvalidTransitionError) as info:
            apply_node_action(state, action)
        assert (info.value.machine, info.value.state, info.value.event) == ("node", state, action)
    else:
        assert apply_node_action(state, action) is expected


def test_tables_are_exactly_the_documented_ones() -> None:
    assert dict(JOB_MACHINE.transitions) == {
        (s.value, a.value): d.value for (s, a), d in JOB_ALLOWED.items()
    }
    assert dict(NODE_MACHINE.transitions) == {
        (s.value, a.value): d.value for (s, a), d in NODE_ALLOWED.items()
    }


def test_job_terminal_states() -> None:
    assert JOB_MACHINE.terminal == {"done", "failed", "cancelled"}
    assert NODE_MACHINE.terminal == frozenset()
    assert JOB_MACHINE.allowed("leased") == {"requeue", "first_token", "finish", "fail", "cancel"}


def test_plain_strings_are_accepted_and_unknown_names_refused() -> None:
    assert apply_job_action("queued", "lease") is JobState.LEASED
    assert apply_node_action("dead", "register") is NodeState.REGISTERING
    with pytest.raises(InvalidTransitionError):
        apply_job_action("queued", "explode")
    with pytest.raises(InvalidTransitionError):
        apply_job_action("paused", "lease")


def test_transition_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        JOB_MACHINE.transitions[("done", "lease")] = "queued"  # type: ignore[index]


def test_a_typical_job_life() -> None:
    state = JobState.QUEUED
    for action in ("lease", "requeue", "lease", "first_token", "token", "token", "finish"):
        state = apply_job_action(state, action)
    assert state is JobState.DONE
    with pytest.raises(InvalidTransitionError):
        apply_job_action(state, "cancel")
