"""Trust root: validation, first use, pinning, role separation and rotation attacks."""

from __future__ import annotations

from typing import Any

import pytest

from resultity_core import (
    BadSignatureError,
    Envelope,
    ExpiredError,
    HashMismatchError,
    PayloadFormatError,
    RootVersionError,
    SecretKey,
    ThresholdNotMetError,
    TrustRoot,
    UnknownKeyError,
    WrongPayloadTypeError,
    load_trusted_root,
    make_root,
    rotate_root,
    sign_envelope,
    verify_envelope,
)

NOW = 1_700_000_000
DAY = 86_400
OLD = [SecretKey(bytes([10 + i]) * 32) for i in range(3)]
NEW = [SecretKey(bytes([20 + i]) * 32) for i in range(3)]
CFG = [SecretKey(bytes([30 + i]) * 32) for i in range(2)]
REL = SecretKey(bytes([40]) * 32)
NET = SecretKey(bytes([41]) * 32)


def root(version: int, root_keys: list[SecretKey], threshold: int = 2, **kw: Any) -> TrustRoot:
    return make_root(
        version=version,
        expires_at=kw.get("expires_at", NOW + 365 * DAY),
        role_keys={
            "root": [k.public_key for k in root_keys],
            "config": [k.public_key for k in CFG],
            "release": [REL.public_key],
            "network": [NET.public_key],
        },
        thresholds={"root": threshold, "config": 2},
    )


def signed(r: TrustRoot, keys: list[SecretKey]) -> Envelope:
    return sign_envelope(r.to_payload(), keys)


def test_payload_round_trip_and_role_contents() -> None:
    r = root(1, OLD)
    assert TrustRoot.from_payload(r.to_payload()) == r
    assert r.role("config").threshold == 2
    assert set(r.role("root").keyids) == {k.keyid for k in OLD}
    assert r.role("release").keyids == (REL.keyid,)
    assert r.digest().startswith("sha256:")


def test_first_use_needs_self_signature_threshold() -> None:
    r = root(1, OLD)
    assert load_trusted_root(signed(r, OLD[:2]), NOW) == r
    with pytest.raises(ThresholdNotMetError):
        load_trusted_root(signed(r, OLD[:1]), NOW)
    with pytest.raises(UnknownKeyError):
        load_trusted_root(signed(r, NEW), NOW)


def test_first_use_pinning_and_expiry() -> None:
    r = root(1, OLD)
    env = signed(r, OLD)
    assert load_trusted_root(env, NOW, pinned_digest=r.digest()) == r
    with pytest.raises(HashMismatchError):
        load_trusted_root(env, NOW, pinned_digest="sha256:" + "0" * 64)
    with pytest.raises(ExpiredError):
        load_trusted_root(env, r.expires_at)
    with pytest.raises(WrongPayloadTypeError):
        load_trusted_root(sign_envelope({"_type": "node-config"}, OLD), NOW)


def test_roles_are_separate() -> None:
    r = root(1, OLD)
    cfg = sign_envelope({"_type": "node-config", "version": 1}, CFG)
    assert verify_envelope(cfg, r, "config", expected_type="node-config")
    by_release_key = sign_envelope({"_type": "node-config", "version": 1}, [REL, CFG[0]])
    with pytest.raises(ThresholdNotMetError):
        verify_envelope(by_release_key, r, "config", expected_type="node-config")
    with pytest.raises(UnknownKeyError):
        verify_envelope(cfg, r, "network", expected_type="node-config")
    with pytest.raises(WrongPayloadTypeError):
        verify_envelope(cfg, r, "config", expected_type="release")


def test_rotation_accepts_next_version_signed_by_old_and_new() -> None:
    v1, v2 = root(1, OLD), root(2, NEW)
    assert rotate_root(v1, signed(v2, OLD[:2] + NEW[:2]), NOW) == v2


def test_rotation_from_an_expired_root_is_allowed() -> None:
    v1 = root(1, OLD, expires_at=NOW - 1)
    v2 = root(2, NEW)
    assert rotate_root(v1, signed(v2, OLD[:2] + NEW[:2]), NOW) == v2


def test_rotation_skipping_a_version_is_refused() -> None:
    v1, v3 = root(1, OLD), root(3, NEW)
    with pytest.raises(RootVersionError, match="consecutive"):
        rotate_root(v1, signed(v3, OLD + NEW), NOW)


def test_rotation_to_same_or_lower_version_is_refused() -> None:
    v2 = root(2, OLD)
    for version in (1, 2):
        with pytest.raises(RootVersionError):
            rotate_root(v2, signed(root(version, NEW), OLD + NEW), NOW)


def test_rotation_missing_old_signatures_is_refused() -> None:
    v1, v2 = root(1, OLD), root(2, NEW)
    with pytest.raises(UnknownKeyError, match="by the root keys of v1"):
        rotate_root(v1, signed(v2, NEW), NOW)
    with pytest.raises(ThresholdNotMetError, match="by the root keys of v1"):
        rotate_root(v1, signed(v2, OLD[:1] + NEW), NOW)


def test_rotation_missing_new_signatures_is_refused() -> None:
    v1, v2 = root(1, OLD), root(2, NEW)
    with pytest.raises(UnknownKeyError, match="by its own root keys"):
        rotate_root(v1, signed(v2, OLD), NOW)
    with pytest.raises(ThresholdNotMetError, match="by its own root keys"):
        rotate_root(v1, signed(v2, OLD + NEW[:1]), NOW)


def test_rotation_with_tampered_payload_is_refused() -> None:
    v1, v2 = root(1, OLD), root(2, NEW)
    env = signed(v2, OLD + NEW)
    evil = dict(env.signed)
    evil["expires_at"] = NOW + 10_000 * DAY
    with pytest.raises(BadSignatureError):
        rotate_root(v1, Envelope(evil, env.signatures), NOW)


def test_rotation_to_an_expired_root_is_refused() -> None:
    v1, v2 = root(1, OLD), root(2, NEW, expires_at=NOW)
    with pytest.raises(ExpiredError):
        rotate_root(v1, signed(v2, OLD + NEW), NOW)


def _payload() -> dict[str, Any]:
    return root(1, OLD).to_payload()


def _set(obj: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    target = obj
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return obj


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        (["version"], 0, "version"),
        (["version"], 1.0, "version"),
        (["expires_at"], "soon", "expires_at"),
        (["roles", "config", "threshold"], 3, "roles.config.threshold"),
        (["roles", "config", "threshold"], 0, "roles.config.threshold"),
        (["roles", "network", "keyids"], [], "roles.network.keyids"),
        (["roles", "network", "keyids"], ["f" * 64], "roles.network.keyids[0]"),
        (["roles", "release"], _DELETE, "roles.release"),
        (["roles", "mirror"], {"keyids": [], "threshold": 1}, "roles.mirror"),
        (["extra"], 1, "extra"),
        (["_type"], "node-config", "_type"),
    ],
)
def test_invalid_roots_name_the_field(path: list[str], value: Any, where: str) -> None:
    with pytest.raises(PayloadFormatError) as info:
        TrustRoot.from_payload(_set(_payload(), path, value))
    assert info.value.path == where


def test_key_id_must_match_the_key() -> None:
    payload = _payload()
    kid = REL.keyid
    payload["keys"][kid]["public"] = NET.public_key.hex
    with pytest.raises(PayloadFormatError, match="not sha256 of the key"):
        TrustRoot.from_payload(payload)


def test_role_listing_a_key_twice_is_refused() -> None:
    payload = _payload()
    payload["roles"]["release"]["keyids"] = [REL.keyid, REL.keyid]
    with pytest.raises(PayloadFormatError, match="listed twice"):
        TrustRoot.from_payload(payload)
