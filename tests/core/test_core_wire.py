"""Node <-> Network wire messages: round trips, canonical bytes, and errors that name the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resultity_core._canonical import canonical_bytes
from resultity_core._errors import WireMessageError
from resultity_core._wire import (
    Capabilities,
    Challenge,
    ChallengeResponse,
    Heartbeat,
    JobEvent,
    JobUsage,
    Lease,
    LeaseBatch,
    LeaseRequest,
    ReceiptSubmit,
    RegisterRequest,
    WireMessage,
    decode_message,
    message_from_bytes,
)

PUB = "ab" * 32
SIG = "cd" * 64
HASH = "sha256:" + "0f" * 32
ENVELOPE = {"signed": {"account": "acct-1", "node_public_key": PUB}, "signatures": []}

EXAMPLES: list[WireMessage] = [
    RegisterRequest(PUB, ENVELOPE, Capabilities(("tiny", "tiny-chat"), 8, "cpu")),
    Challenge("00" * 32),
    ChallengeResponse("node-1", SIG),
    Heartbeat("node-1", 7, HASH, "0.1.0", 2, 6, "ready"),
    Heartbeat("node-1", 0, None, "0.1.0", 0, 8, "syncing"),
    LeaseRequest("node-1", 4, 25_000),
    Lease("job-1", "tiny", {"messages": [{"role": "user", "content": "hi"}]}, 1_700_000_000_000),
    LeaseBatch((Lease("j1", "tiny", {}, 1), Lease("j2", "tiny", {"n": 2}, 2))),
    LeaseBatch(()),
    JobEvent("job-1", 0, "token", text="Hel", token_ids=(5, 6)),
    JobEvent("job-1", 3, "done", finish_reason="stop", usage=JobUsage(3, 2)),
    JobEvent("job-1", 4, "error", error="runtime crashed"),
    JobEvent("job-1", 1, "token", index=1, text="x", logprobs=({"token": "x", "lp": "-0.5"},)),
    ReceiptSubmit({"signed": {"job_id": "job-1"}, "signatures": [{"keyid": "k", "sig": "s"}]}),
    Heartbeat("node-1", 9, HASH, "0.1.0", 0, 8, "ready", "release 0.2.0 refused: older"),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_through_payload_and_bytes(message: WireMessage) -> None:
    payload = message.to_payload()
    assert payload["_type"] == message.TYPE
    assert type(message).from_payload(payload) == message
    assert decode_message(payload) == message
    data = message.to_bytes()
    assert data == canonical_bytes(payload)
    assert message_from_bytes(data) == message
    # Key order does not matter on the way in.
    shuffled = json.dumps(dict(reversed(list(payload.items())))).encode()
    assert message_from_bytes(shuffled) == message


def test_payload_shape_is_plain_json() -> None:
    msg = RegisterRequest(PUB, ENVELOPE, Capabilities(("tiny",), 8, "cpu"))
    assert msg.to_payload() == {
        "_type": "register_request",
        "node_public_key": PUB,
        "grant": ENVELOPE,
        "capabilities": {"models": ["tiny"], "max_batch": 8, "device": "cpu"},
    }
    event = JobEvent("j", 0, "done", finish_reason="length", usage=JobUsage(1, 2))
    assert event.to_payload()["usage"] == {"prompt_tokens": 1, "completion_tokens": 2}
    assert event.usage is not None
    assert event.usage.total_tokens == 3


def test_payload_is_copied_not_aliased() -> None:
    request: dict[str, Any] = {"messages": []}
    lease = Lease("j", "m", request, 1)
    lease.to_payload()["request"]["messages"].append(1)
    assert lease.request == {"messages": []}
    parsed = Lease.from_payload(
        {"_type": "lease", "job_id": "j", "model": "m", "request": request, "deadline_ms": 1}
    )
    request["messages"].append(2)
    assert parsed.request == {"messages": []}


def test_unknown_fields_are_ignored_and_optional_fields_default() -> None:
    event = JobEvent.from_payload(
        {"_type": "job_event", "job_id": "j", "seq": 0, "kind": "token", "future": 1}
    )
    assert event == JobEvent("j", 0, "token")
    heartbeat = decode_message(
        {
            "_type": "heartbeat",
            "node_id": "n",
            "seq": 1,
            "runtime_version": "1",
            "active_jobs": 0,
            "free_slots": 1,
            "status": "ready",
        }
    )
    assert isinstance(heartbeat, Heartbeat)
    assert heartbeat.config_hash is None
    assert heartbeat.update_status is None  # a node without the updater sends none


def _bad(message: WireMessage, **changes: Any) -> dict[str, Any]:
    payload = message.to_payload()
    for key, value in changes.items():
        if value is _DROP:
            del payload[key]
        else:
            payload[key] = value
    return payload


_DROP = object()
_REG, _CH, _RESP, _HB, _, _LR, _LEASE, _BATCH, _, _TOK, _DONE = EXAMPLES[:11]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (_bad(_REG, node_public_key="ab" * 31), "node_public_key"),
        (_bad(_REG, node_public_key="AB" * 32), "node_public_key"),
        (_bad(_REG, node_public_key="zz" * 32), "node_public_key"),
        (_bad(_REG, grant=[1]), "grant"),
        (_bad(_REG, grant={"signed": {"x": 1.5}}), "grant.signed.x"),
        (
            _bad(_REG, capabilities={"models": ["a", 3], "max_batch": 1, "device": "cpu"}),
            "capabilities.models[1]",
        ),
        (
            _bad(_REG, capabilities={"models": [], "max_batch": 0, "device": "cpu"}),
            "capabilities.max_batch",
        ),
        (_bad(_REG, capabilities={"models": [], "max_batch": 1}), "capabilities.device"),
        (_bad(_REG, capabilities="cpu"), "capabilities"),
        (_bad(_CH, nonce="00" * 8), "nonce"),
        (_bad(_RESP, signature=SIG[:-2]), "signature"),
        (_bad(_RESP, node_id=""), "node_id"),
        (_bad(_RESP, node_id=_DROP), "node_id"),
        (_bad(_HB, seq=-1), "seq"),
        (_bad(_HB, seq=True), "seq"),
        (_bad(_HB, active_jobs=1.0), "active_jobs"),
        (_bad(_HB, config_hash="md5:abc"), "config_hash"),
        (_bad(_HB, status=None), "status"),
        (_bad(_LR, max_jobs=0), "max_jobs"),
        (_bad(_LR, wait_ms=600_001), "wait_ms"),
        (_bad(_LR, wait_ms="1000"), "wait_ms"),
        (_bad(_LEASE, request="{}"), "request"),
        (_bad(_LEASE, deadline_ms=1.5), "deadline_ms"),
        (_bad(_BATCH, leases=[{"_type": "lease", "job_id": "j"}]), "leases[0].model"),
        (_bad(_BATCH, leases={}), "leases"),
        (_bad(_TOK, kind="tokens"), "kind"),
        (_bad(_TOK, token_ids=[1, "2"]), "token_ids[1]"),
        (_bad(_TOK, token_ids=[1, -2]), "token_ids[1]"),
        (_bad(_TOK, text=None), "text"),
        (_bad(_TOK, finish_reason="stop"), "finish_reason"),
        (_bad(_TOK, error="boom"), "error"),
        (_bad(_DONE, finish_reason=None), "finish_reason"),
        (_bad(_DONE, finish_reason="halted"), "finish_reason"),
        (_bad(_DONE, usage=None), "usage"),
        (_bad(_DONE, usage={"prompt_tokens": 1}), "usage.completion_tokens"),
        (
            _bad(_DONE, usage={"prompt_tokens": 1, "completion_tokens": -1}),
            "usage.completion_tokens",
        ),
        (_bad(EXAMPLES[11], error=None), "error"),
        (_bad(EXAMPLES[12], logprobs=[{"lp": -0.5}]), "logprobs[0].lp"),
        (_bad(EXAMPLES[13], receipt={"signed": 1, "signatures": []}), "receipt.signed"),
        (_bad(EXAMPLES[13], receipt={"signed": {}}), "receipt.signatures"),
        (_bad(EXAMPLES[14], update_status=7), "update_status"),
        (_bad(EXAMPLES[14], update_status="x" * 1001), "update_status"),
    ],
)
def test_invalid_payload_names_the_field(payload: dict[str, Any], field: str) -> None:
    with pytest.raises(WireMessageError) as info:
        decode_message(payload)
    assert info.value.field == field, str(info.value)


@pytest.mark.parametrize("tag", ["challenge", None, 3, _DROP])
def test_wrong_or_missing_type_tag(tag: object) -> None:
    with pytest.raises(WireMessageError) as info:
        RegisterRequest.from_payload(_bad(_REG, _type=tag))
    assert info.value.field == "_type"
    with pytest.raises(WireMessageError) as info:
        RegisterRequest.from_payload([1])  # type: ignore[arg-type]
    assert info.value.field == "<root>"


def test_constructor_validates_too() -> None:
    with pytest.raises(WireMessageError) as info:
        LeaseRequest("n", 1, -5)
    assert info.value.field == "wait_ms"
    with pytest.raises(WireMessageError) as info:
        Capabilities(("a",), 1, "")
    assert info.value.field == "device"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b'{"_type": "challenge", "nonce": 1.0}', "floats"),
        (b'{"_type": "challenge", "nonce": NaN}', "floats"),
        (b"\xff\xfe", "JSON"),
        (b"{not json", "JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"_type": "launch_missiles"}', "unknown message type"),
    ],
)
def test_bytes_that_are_not_a_message(data: bytes, fragment: str) -> None:
    with pytest.raises(WireMessageError, match=fragment):
        message_from_bytes(data)


_ids = st.text(min_size=1, max_size=20)
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10))
_json = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)
_objects = st.dictionaries(st.text(max_size=8), _json, max_size=4)


@given(
    job_id=_ids,
    seq=st.integers(min_value=0),
    index=st.integers(min_value=0, max_value=1024),
    text=st.text(max_size=50),
    token_ids=st.lists(st.integers(min_value=0, max_value=1 << 31), max_size=8),
    done=st.booleans(),
    usage=st.tuples(st.integers(min_value=0), st.integers(min_value=0)),
)
def test_job_event_round_trip_property(
    job_id: str,
    seq: int,
    index: int,
    text: str,
    token_ids: list[int],
    done: bool,
    usage: tuple[int, int],
) -> None:
    if done:
        event = JobEvent(
            job_id,
            seq,
            "done",
            index=index,
            text=text,
            token_ids=tuple(token_ids),
            finish_reason="length",
            usage=JobUsage(*usage),
        )
    else:
        event = JobEvent(job_id, seq, "token", index=index, text=text, token_ids=tuple(token_ids))
    assert message_from_bytes(event.to_bytes()) == event


@given(
    node_key=st.binary(min_size=32, max_size=32),
    grant=_objects,
    models=st.lists(_ids, max_size=4),
    max_batch=st.integers(min_value=1, max_value=1 << 16),
    request=_objects,
    deadline=st.integers(min_value=0),
)
def test_register_and_lease_round_trip_property(
    node_key: bytes,
    grant: dict[str, Any],
    models: list[str],
    max_batch: int,
    request: dict[str, Any],
    deadline: int,
) -> None:
    reg = RegisterRequest(node_key.hex(), grant, Capabilities(tuple(models), max_batch, "cuda"))
    assert message_from_bytes(reg.to_bytes()) == reg
    lease = Lease("job", "model", request, deadline)
    batch = LeaseBatch((lease, lease))
    assert message_from_bytes(batch.to_bytes()) == batch
