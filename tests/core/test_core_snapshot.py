"""The node's rules: one test per attack on snapshots, releases and commands."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resultity_core import (
    BadSignatureError,
    Envelope,
    ExpiredError,
    FutureDatedError,
    HashMismatchError,
    MalformedEnvelopeError,
    NodeTrustState,
    PayloadFormatError,
    ReplayError,
    ResultityError,
    RollbackError,
    RootVersionError,
    SecretKey,
    ThresholdNotMetError,
    TrustRoot,
    UnknownKeyError,
    WrongNodeError,
    WrongPayloadTypeError,
    check_node_config,
    example_node_config,
    make_root,
    node_config_hash,
    sign_envelope,
)

NOW = 1_700_000_000
DAY = 86_400
ROOT_KEYS = [SecretKey(bytes([60 + i]) * 32) for i in range(2)]
CFG = [SecretKey(bytes([70 + i]) * 32) for i in range(3)]
REL = [SecretKey(bytes([80 + i]) * 32) for i in range(2)]
NET = SecretKey(b"\x5a" * 32)
STRANGER = SecretKey(b"\x99" * 32)
NODE_ID = "node-1"


def make_trust(version: int = 1, root_keys: list[SecretKey] = ROOT_KEYS, **kw: Any) -> TrustRoot:
    return make_root(
        version=version,
        expires_at=kw.get("expires_at", NOW + 365 * DAY),
        role_keys={
            "root": [k.public_key for k in root_keys],
            "config": [k.public_key for k in CFG],
            "release": [k.public_key for k in REL],
            "network": [NET.public_key],
        },
        thresholds={"config": 2, "release": 2},
    )


TRUST = make_trust()


def state() -> NodeTrustState:
    return NodeTrustState(TRUST, node_id=NODE_ID)


def config(version: int = 1, **changes: Any) -> dict[str, Any]:
    payload = example_node_config(now=NOW, version=version).to_payload()
    payload.update(changes)
    return payload


def snap(version: int = 1, keys: list[SecretKey] = CFG[:2], **changes: Any) -> Envelope:
    return sign_envelope(config(version, **changes), keys)


def release(version: int, keys: list[SecretKey] = REL, **changes: Any) -> Envelope:
    payload = {
        "_type": "release",
        "version": version,
        "agent_version": f"0.{version}.0",
        "runtime_version": f"0.{version}.0",
        "artifacts": [{"name": "a.whl", "sha256": "sha256:" + "0" * 64, "size": 1}],
        "issued_at": NOW,
        "expires_at": NOW + DAY,
        **changes,
    }
    return sign_envelope(payload, keys)


def command(
    nonce: str = "a" * 16, node_id: str = NODE_ID, key: SecretKey = NET, **changes: Any
) -> Envelope:
    payload = {
        "_type": "command",
        "node_id": node_id,
        "nonce": nonce,
        "issued_at": NOW,
        "expires_at": NOW + 60,
        "action": "drain",
        "args": {},
        **changes,
    }
    return sign_envelope(payload, [key])


def assert_refused(s: NodeTrustState, env: Any, error: type[Exception], **kw: Any) -> None:
    before = (s.current, s.current_hash)
    with pytest.raises(error):
        s.apply(env, now=kw.pop("now", NOW), **kw)
    assert (s.current, s.current_hash) == before
    assert s.last_rejection is not None
    assert isinstance(s.last_rejection.error, error)
    assert error.__name__ in str(s.last_rejection)


def test_apply_valid_snapshot_then_newer() -> None:
    s = state()
    env = snap(1)
    got = s.apply(env, now=NOW, expected_hash=node_config_hash(env.signed))
    assert s.current == got
    assert s.current.version == 1
    assert s.current_hash == env.digest()
    assert s.last_rejection is None
    s.apply(snap(2), now=NOW)
    assert s.current.version == 2


def test_apply_accepts_bytes_and_json_objects() -> None:
    s = state()
    s.apply(snap(1).to_bytes(), now=NOW)
    s.apply(snap(2).to_payload(), now=NOW)
    assert s.current is not None
    assert s.current.version == 2


def test_same_snapshot_twice_is_idempotent() -> None:
    s = state()
    first = s.apply(snap(1), now=NOW)
    assert s.apply(snap(1), now=NOW + 10) == first
    assert s.current == first


def test_tampered_payload_is_refused() -> None:
    s = state()
    s.apply(snap(1), now=NOW)
    env = snap(2)
    evil = dict(env.signed)
    evil["runtime"] = {**evil["runtime"], "max_batch_size": 4096}
    assert_refused(s, Envelope(evil, env.signatures), BadSignatureError)
    assert s.current is not None
    assert s.current.version == 1  # the last good one stays in force


def test_wrong_key_is_refused() -> None:
    assert_refused(state(), snap(1, keys=[STRANGER, NET]), UnknownKeyError)


def test_key_of_another_role_does_not_count() -> None:
    assert_refused(state(), snap(1, keys=[CFG[0], REL[0]]), ThresholdNotMetError)


def test_below_threshold_is_refused() -> None:
    assert_refused(state(), snap(1, keys=CFG[:1]), ThresholdNotMetError)


def test_same_key_counted_twice_is_refused() -> None:
    env = snap(1, keys=CFG[:1])
    doubled = Envelope(env.signed, env.signatures * 2)
    assert_refused(state(), doubled, ThresholdNotMetError)


def test_rollback_is_refused() -> None:
    s = state()
    s.apply(snap(3), now=NOW)
    assert_refused(s, snap(2), RollbackError)
    assert s.current is not None
    assert s.current.version == 3


def test_same_version_different_content_is_refused() -> None:
    s = state()
    s.apply(snap(3), now=NOW)
    assert_refused(s, snap(3, issued_at=NOW - 5), RollbackError)


def test_expired_snapshot_is_refused() -> None:
    s = state()
    env = snap(1)
    assert_refused(s, env, ExpiredError, now=env.signed["expires_at"])


def test_expired_trust_root_freezes_updates() -> None:
    s = NodeTrustState(make_trust(expires_at=NOW + 10), node_id=NODE_ID)
    assert_refused(s, snap(1), ExpiredError, now=NOW + 10)


def test_future_dated_snapshot_is_refused_beyond_skew() -> None:
    s = state()
    assert_refused(s, snap(1, issued_at=NOW + 301), FutureDatedError)
    s.apply(snap(1, issued_at=NOW + 300), now=NOW)  # within the default skew
    tight = NodeTrustState(TRUST, node_id=NODE_ID, skew=0)
    assert_refused(tight, snap(1, issued_at=NOW + 1), FutureDatedError)


def test_hash_mismatch_is_refused() -> None:
    s = state()
    other = node_config_hash(snap(2).signed)
    assert_refused(s, snap(1), HashMismatchError, expected_hash=other)


def test_wrong_payload_type_and_malformed_input_are_refused() -> None:
    assert_refused(state(), release(1, keys=CFG), WrongPayloadTypeError)
    assert_refused(state(), b'{"signed": ', MalformedEnvelopeError)
    bad_format = snap(1, runtime={"backend": "torch"})
    assert_refused(state(), bad_format, PayloadFormatError)


def test_rejection_is_cleared_by_the_next_success() -> None:
    s = state()
    assert_refused(s, snap(1, keys=CFG[:1]), ThresholdNotMetError)
    s.apply(snap(1), now=NOW)
    assert s.last_rejection is None


def test_pure_check_with_applied_version() -> None:
    cfg, digest = check_node_config(snap(4), TRUST, NOW, applied_version=4)
    assert cfg.version == 4
    assert digest == node_config_hash(cfg)
    with pytest.raises(RollbackError):
        check_node_config(snap(4), TRUST, NOW, applied_version=5)


def test_release_rules() -> None:
    s = state()
    assert s.apply_release(release(2), now=NOW).version == 2
    with pytest.raises(RollbackError):
        s.apply_release(release(1), now=NOW)
    with pytest.raises(ThresholdNotMetError):
        s.apply_release(release(3, keys=REL[:1]), now=NOW)
    with pytest.raises(UnknownKeyError):
        s.apply_release(release(3, keys=CFG), now=NOW)
    with pytest.raises(ExpiredError):
        s.apply_release(release(3), now=NOW + DAY)
    assert s.release is not None
    assert s.release.version == 2
    assert s.last_rejection is not None
    assert s.last_rejection.what == "release"
    assert s.apply_release(release(3), now=NOW).version == 3


def test_command_accepted_once_then_replay_refused() -> None:
    s = state()
    assert s.accept_command(command(), now=NOW).action == "drain"
    with pytest.raises(ReplayError):
        s.accept_command(command(), now=NOW + 1)
    assert s.accept_command(command(nonce="b" * 16), now=NOW + 1).nonce == "b" * 16


def test_command_for_another_node_is_refused() -> None:
    with pytest.raises(WrongNodeError):
        state().accept_command(command(node_id="node-2"), now=NOW)


def test_command_expired_future_or_badly_signed_is_refused() -> None:
    s = state()
    with pytest.raises(ExpiredError):
        s.accept_command(command(), now=NOW + 60)
    with pytest.raises(FutureDatedError):
        s.accept_command(command(issued_at=NOW + 1000, expires_at=NOW + 2000), now=NOW)
    with pytest.raises(UnknownKeyError):
        s.accept_command(command(key=CFG[0]), now=NOW)
    assert s.nonce_count == 0


def test_nonce_memory_is_bounded_without_opening_a_replay_window() -> None:
    s = NodeTrustState(TRUST, node_id=NODE_ID, max_nonces=3)
    for i in range(5):
        s.accept_command(command(nonce=f"{i:016d}", expires_at=NOW + 100 + i), now=NOW)
    assert s.nonce_count == 3
    assert s.nonce_floor == NOW + 101
    for i in range(5):  # forgotten or remembered, every replay is refused
        with pytest.raises(ReplayError):
            s.accept_command(command(nonce=f"{i:016d}", expires_at=NOW + 100 + i), now=NOW)
    s.accept_command(command(nonce="f" * 16, expires_at=NOW + 500), now=NOW)


def test_expired_nonces_are_forgotten() -> None:
    s = state()
    s.accept_command(command(expires_at=NOW + 10), now=NOW)
    s.accept_command(command(nonce="c" * 16, expires_at=NOW + 100), now=NOW + 20)
    assert s.nonce_count == 1
    # the clock going backwards cannot resurrect the forgotten nonce
    with pytest.raises(ReplayError):
        s.accept_command(command(expires_at=NOW + 10), now=NOW)


def test_root_rotation_through_the_state() -> None:
    s = state()
    s.apply(snap(1), now=NOW)
    new_keys = [SecretKey(bytes([90 + i]) * 32) for i in range(2)]
    v2 = make_trust(2, new_keys)
    with pytest.raises(UnknownKeyError):
        s.update_root(sign_envelope(v2.to_payload(), new_keys), now=NOW)
    v3 = make_trust(3, new_keys)
    with pytest.raises(RootVersionError):
        s.update_root(sign_envelope(v3.to_payload(), ROOT_KEYS + new_keys), now=NOW)
    assert s.root == TRUST
    assert s.update_root(sign_envelope(v2.to_payload(), ROOT_KEYS + new_keys), now=NOW) == v2
    assert s.root.version == 2
    assert s.current is not None  # the applied config survives a rotation


def test_state_survives_a_restart() -> None:
    s = state()
    s.apply(snap(3), now=NOW)
    s.apply_release(release(2), now=NOW)
    s.accept_command(command(), now=NOW)
    saved = json.loads(json.dumps(s.export_state()))
    again = NodeTrustState.restore(saved)
    assert again.node_id == NODE_ID
    assert again.root == TRUST
    assert (again.current, again.current_hash) == (s.current, s.current_hash)
    assert again.release == s.release
    with pytest.raises(RollbackError):
        again.apply(snap(2), now=NOW)
    with pytest.raises(RollbackError):
        again.apply_release(release(1), now=NOW)
    with pytest.raises(ReplayError):
        again.accept_command(command(), now=NOW + 1)
    assert NodeTrustState.restore(state().export_state()).current is None


@pytest.mark.parametrize(
    ("key", "value", "where"),
    [
        ("_type", "root", "_type"),
        ("nonces", [["a" * 16, 1.5]], "nonces[0]"),
        ("nonces", [["a" * 16, 1], ["a" * 16, 2]], "nonces[1]"),
        ("nonce_floor", "x", "nonce_floor"),
        ("extra", 1, "extra"),
    ],
)
def test_damaged_state_is_refused(key: str, value: Any, where: str) -> None:
    saved = state().export_state()
    saved[key] = value
    with pytest.raises(PayloadFormatError) as info:
        NodeTrustState.restore(saved)
    assert info.value.path == where


SIGNED_BYTES = snap(1).to_bytes()


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(SIGNED_BYTES) - 1), st.integers(1, 255))
def test_any_single_byte_change_is_rejected(index: int, delta: int) -> None:
    data = bytearray(SIGNED_BYTES)
    data[index] = (data[index] + delta) % 256
    s = state()
    with pytest.raises(ResultityError):
        s.apply(bytes(data), now=NOW)
    assert s.current is None


@pytest.mark.parametrize("flip", [0x01, 0x20])
def test_every_position_flipped_is_rejected(flip: int) -> None:
    s = state()
    for index in range(len(SIGNED_BYTES)):
        data = bytearray(SIGNED_BYTES)
        data[index] ^= flip
        with pytest.raises(ResultityError):
            s.apply(bytes(data), now=NOW)
    assert s.current is None
