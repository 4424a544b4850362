"""Signed envelopes: parsing, signing, and the counting rule of verify_signatures."""

from __future__ import annotations

import json

import pytest

import resultity_core
from resultity_core import (
    BadSignatureError,
    Envelope,
    MalformedEnvelopeError,
    SecretKey,
    Signature,
    SignatureVerificationError,
    ThresholdNotMetError,
    UnknownKeyError,
    WrongPayloadTypeError,
    canonical_bytes,
    check_payload_type,
    parse_json_strict,
    sign_envelope,
    verify_signatures,
)

K = [SecretKey(bytes([i]) * 32) for i in range(1, 5)]
KEYS = {k.keyid: k.public_key for k in K}
KID, SIG = "a" * 64, "a" * 128
PAYLOAD = {"_type": "node-config", "version": 3, "future_field": {"kept": True}}


def verify(env: Envelope, role_keys: list[SecretKey], threshold: int) -> tuple[str, ...]:
    return verify_signatures(
        env, keys=KEYS, role_keyids=[k.keyid for k in role_keys], threshold=threshold, role="config"
    )


def test_signature_covers_canonical_bytes_of_payload() -> None:
    env = sign_envelope(PAYLOAD, [K[0]])
    assert env.signatures == (Signature(K[0].keyid, K[0].sign(canonical_bytes(PAYLOAD)).hex()),)
    assert verify(env, K[:1], 1) == (K[0].keyid,)


def test_round_trip_keeps_unknown_payload_fields_and_signatures() -> None:
    env = sign_envelope(PAYLOAD, K[:2])
    again = Envelope.from_bytes(env.to_bytes())
    assert again == env
    assert again.signed["future_field"] == {"kept": True}
    assert verify(again, K[:2], 2) == tuple(sorted(k.keyid for k in K[:2]))


def test_signing_again_with_the_same_key_does_not_duplicate() -> None:
    env = sign_envelope(sign_envelope(PAYLOAD, [K[0], K[0]]), [K[0], K[1]])
    assert [s.keyid for s in env.signatures] == [K[0].keyid, K[1].keyid]


def test_tampered_payload_is_a_bad_signature() -> None:
    env = sign_envelope(PAYLOAD, [K[0]])
    tampered = Envelope({**env.signed, "version": 4}, env.signatures)
    with pytest.raises(BadSignatureError) as info:
        verify(tampered, K[:1], 1)
    assert info.value.bad == (K[0].keyid,)
    assert info.value.valid == ()


def test_wrong_key_is_unknown_key() -> None:
    env = sign_envelope(PAYLOAD, [K[3]])
    with pytest.raises(UnknownKeyError) as info:
        verify(env, K[:2], 1)
    assert info.value.unknown == (K[3].keyid,)


def test_below_threshold() -> None:
    env = sign_envelope(PAYLOAD, [K[0], K[3]])
    with pytest.raises(ThresholdNotMetError) as info:
        verify(env, K[:3], 2)
    assert info.value.valid == (K[0].keyid,)
    assert info.value.unknown == (K[3].keyid,)
    assert "1 valid signature(s) of role 'config', threshold 2" in str(info.value)


def test_no_signatures_is_threshold_not_met() -> None:
    with pytest.raises(ThresholdNotMetError):
        verify(Envelope(PAYLOAD), K[:1], 1)


def test_same_key_listed_twice_counts_once() -> None:
    one = sign_envelope(PAYLOAD, [K[0]])
    doubled = Envelope(one.signed, one.signatures * 2)
    with pytest.raises(ThresholdNotMetError) as info:
        verify(doubled, K[:2], 2)
    assert info.value.valid == (K[0].keyid,)


def test_reached_threshold_ignores_extra_unknown_and_bad_signatures() -> None:
    env = sign_envelope(PAYLOAD, [K[0], K[1], K[3]])
    forged = Signature(K[2].keyid, K[2].sign(b"something else").hex())
    env = Envelope(env.signed, (*env.signatures, forged))
    assert verify(env, K[:3], 2) == tuple(sorted(k.keyid for k in K[:2]))


def test_bad_signature_with_some_valid_below_threshold_reports_bad() -> None:
    env = sign_envelope(PAYLOAD, [K[0]])
    forged = Signature(K[1].keyid, K[1].sign(b"x").hex())
    with pytest.raises(BadSignatureError) as info:
        verify(Envelope(env.signed, (*env.signatures, forged)), K[:2], 2)
    assert info.value.valid == (K[0].keyid,)
    assert info.value.bad == (K[1].keyid,)


def test_all_failures_share_one_base_class() -> None:
    for cls in (BadSignatureError, UnknownKeyError, ThresholdNotMetError):
        assert issubclass(cls, SignatureVerificationError)


def test_payload_type_check() -> None:
    env = sign_envelope(PAYLOAD, [K[0]])
    check_payload_type(env, "node-config")
    with pytest.raises(WrongPayloadTypeError, match="'node-config', expected 'release'"):
        check_payload_type(env, "release")


def test_signing_needs_a_typed_payload() -> None:
    with pytest.raises(MalformedEnvelopeError, match="_type"):
        sign_envelope({"version": 1}, [K[0]])


@pytest.mark.parametrize(
    ("obj", "path"),
    [
        ([], ""),
        ({"signed": {}, "signatures": [], "x": 1}, "x"),
        ({"signatures": []}, "signed"),
        ({"signed": [], "signatures": []}, "signed"),
        ({"signed": {"a": 1.5}, "signatures": []}, "signed.a"),
        ({"signed": {}, "signatures": {}}, "signatures"),
        ({"signed": {}, "signatures": [{"keyid": "a" * 64}]}, "signatures[0]"),
        ({"signed": {}, "signatures": [{"keyid": KID.upper(), "sig": SIG}]}, "signatures[0].keyid"),
        ({"signed": {}, "signatures": [{"keyid": KID, "sig": SIG[1:]}]}, "signatures[0].sig"),
        ({"signed": {}, "signatures": [{"keyid": "a" * 64, "sig": 5}]}, "signatures[0].sig"),
    ],
)
def test_malformed_envelopes_name_the_field(obj: object, path: str) -> None:
    with pytest.raises(MalformedEnvelopeError) as info:
        Envelope.from_payload(obj)
    assert info.value.path == path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": 1, "a": 2}', "duplicate key"),
        ('{"a": ', "invalid JSON"),
        (b"\xff\xfe", "UTF-8"),
    ],
)
def test_strict_json_parsing(text: str | bytes, message: str) -> None:
    with pytest.raises(MalformedEnvelopeError, match=message):
        parse_json_strict(text)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "1.0", "1e5", "1e400"])
def test_floats_in_envelope_text_are_refused_naming_the_path(number: str) -> None:
    text = '{"signed": {"_type": "x", "a": [0, ' + number + ']}, "signatures": []}'
    with pytest.raises(MalformedEnvelopeError) as info:
        Envelope.from_bytes(text)
    assert info.value.path == "signed.a[1]"


def test_deeply_nested_json_is_refused_cleanly() -> None:
    with pytest.raises(MalformedEnvelopeError):
        parse_json_strict("[" * 100_000)


def test_to_payload_is_plain_json() -> None:
    env = sign_envelope(PAYLOAD, [K[0]])
    assert json.loads(json.dumps(env.to_payload())) == env.to_payload()


SIGNED_FORMAT_NAMES = """
KEY_FILE_TYPE KEY_TYPE PublicKey SecretKey generate_key key_id load_key_file save_key_file
Envelope Signature check_payload_type parse_json_strict sign_envelope verify_signatures
ROLES ROOT_TYPE Role TrustRoot load_trusted_root make_root rotate_root verify_envelope
BACKENDS ModelEntry ModelFile NetworkParams NodeConfig Participation Price Resources
RuntimeParams example_node_config node_config_hash Artifact Release DEFAULT_SKEW Command
NodeGrant Receipt sign_grant sign_receipt verify_grant verify_receipt NodeTrustState Rejection
as_envelope check_command check_node_config check_release BadSignatureError ExpiredError
FutureDatedError HashMismatchError KeyFileError MalformedEnvelopeError PayloadFormatError
ReplayError RollbackError RootVersionError RuleViolationError SignatureVerificationError
ThresholdNotMetError UnknownKeyError WrongNodeError WrongPayloadTypeError
""".split()  # noqa: SIM905 - a word list reads better than 65 quoted strings


def test_public_surface_of_the_signed_formats() -> None:
    for name in SIGNED_FORMAT_NAMES:
        assert name in resultity_core.__all__, name
        assert getattr(resultity_core, name) is not None
    for name in SIGNED_FORMAT_NAMES:
        obj = getattr(resultity_core, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, resultity_core.ResultityError), name
