"""Signed formats: exact round trips, strict validation naming the field, sign and verify."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resultity_core import (
    BadSignatureError,
    Command,
    Envelope,
    ExpiredError,
    FutureDatedError,
    NodeConfig,
    NodeGrant,
    PayloadFormatError,
    Receipt,
    Release,
    SecretKey,
    UnknownKeyError,
    WrongPayloadTypeError,
    canonical_digest,
    example_node_config,
    node_config_hash,
    sign_envelope,
    sign_grant,
    sign_receipt,
    verify_grant,
    verify_receipt,
)

NOW = 1_700_000_000
DIGEST = "sha256:" + "ab" * 32
ACCOUNT = SecretKey(b"\x51" * 32)
NODE = SecretKey(b"\x52" * 32)


def config_payload() -> dict[str, Any]:
    return example_node_config(now=NOW).to_payload()


def release_payload() -> dict[str, Any]:
    return {
        "_type": "release",
        "version": 7,
        "agent_version": "0.2.0",
        "runtime_version": "0.2.0",
        "artifacts": [{"name": "resultity-0.2.0-py3-none-any.whl", "sha256": DIGEST, "size": 10}],
        "issued_at": NOW,
        "expires_at": NOW + 3600,
    }


def command_payload() -> dict[str, Any]:
    return {
        "_type": "command",
        "node_id": NODE.keyid,
        "nonce": "n" * 32,
        "issued_at": NOW,
        "expires_at": NOW + 60,
        "action": "drain",
        "args": {"reason": "maintenance", "deadline_ms": 5000},
    }


def receipt() -> Receipt:
    return Receipt(
        job_id="job-1",
        node_id=NODE.keyid,
        model="tiny",
        request_hash=DIGEST,
        output_hash="sha256:" + "cd" * 32,
        prompt_tokens=12,
        completion_tokens=34,
        issued_at=NOW,
    )


@pytest.mark.parametrize(
    ("cls", "make"),
    [(NodeConfig, config_payload), (Release, release_payload), (Command, command_payload)],
)
def test_payload_round_trip_is_exact(cls: Any, make: Any) -> None:
    payload = make()
    parsed = cls.from_payload(payload)
    assert parsed.to_payload() == payload
    assert cls.from_payload(parsed.to_payload()) == parsed


def test_node_config_hash_is_digest_of_payload() -> None:
    config = example_node_config(now=NOW)
    assert node_config_hash(config) == node_config_hash(config.to_payload())
    assert node_config_hash(config) == canonical_digest(config.to_payload())
    other = example_node_config(now=NOW, version=2)
    assert node_config_hash(other) != node_config_hash(config)


def test_example_config_contents() -> None:
    config = example_node_config(now=NOW)
    assert config.issued_at == NOW
    assert config.expires_at == NOW + 30 * 86_400
    entry = config.model("tiny")
    assert entry is not None
    assert entry.price.completion_per_1k == 200
    assert config.model("missing") is None


def _mutate(payload: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Set (or with value=DELETE remove) ``a.b[0].c`` in a copy of payload."""
    out = copy.deepcopy(payload)
    parts: list[Any] = []
    for part in path.replace("]", "").split("."):
        name, *indexes = part.split("[")
        parts.append(name)
        parts.extend(int(i) for i in indexes)
    target: Any = out
    for key in parts[:-1]:
        target = target[key]
    if value is DELETE:
        del target[parts[-1]]
    else:
        target[parts[-1]] = value
    return out


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        ("models[0].files[0].size", 1.0, "models[0].files[0].size"),
        ("models[0].files[0].size", -1, "models[0].files[0].size"),
        ("models[0].files[0].size", True, "models[0].files[0].size"),
        ("models[0].files[0].sha256", "ab" * 32, "models[0].files[0].sha256"),
        ("models[0].files[0].sha256", "sha256:" + "AB" * 32, "models[0].files[0].sha256"),
        ("models[0].files[0].path", "../etc/passwd", "models[0].files[0].path"),
        ("models[0].files[0].path", "/abs", "models[0].files[0].path"),
        ("models[0].files[0].path", "a//b", "models[0].files[0].path"),
        ("models[0].files[0].extra", 1, "models[0].files[0].extra"),
        ("models[0].files", [], "models[0].files"),
        ("models[0].price.prompt_per_1k", 0.5, "models[0].price.prompt_per_1k"),
        ("models[0].price", DELETE, "models[0].price"),
        ("models[0].name", "", "models[0].name"),
        ("models[0].name", "bad name", "models[0].name"),
        ("version", 0, "version"),
        ("version", "1", "version"),
        ("issued_at", None, "issued_at"),
        ("expires_at", NOW, "expires_at"),
        ("runtime.backend", "cuda-magic", "runtime.backend"),
        ("runtime.max_batch_size", 0, "runtime.max_batch_size"),
        ("runtime.dtype", "float64", "runtime.dtype"),
        ("runtime.dtype", 16, "runtime.dtype"),
        ("runtime.quantization", "int8", "runtime.quantization"),
        ("network.endpoints[0]", "ftp://x", "network.endpoints[0]"),
        ("network.endpoints", [], "network.endpoints"),
        ("network.lease_timeout_ms", 30.0, "network.lease_timeout_ms"),
        ("participation.accept_jobs", 1, "participation.accept_jobs"),
        ("resources.max_disk_bytes", DELETE, "resources.max_disk_bytes"),
        ("resources.gpu", 1, "resources.gpu"),
        ("surprise", {}, "surprise"),
        ("_type", "release", "_type"),
    ],
)
def test_node_config_refusals_name_the_field(path: str, value: Any, where: str) -> None:
    with pytest.raises(PayloadFormatError) as info:
        NodeConfig.from_payload(_mutate(config_payload(), path, value))
    assert info.value.path == where


def test_runtime_dtype_and_quantization_are_optional_and_round_trip() -> None:
    payload = config_payload()
    assert "dtype" not in payload["runtime"]  # the defaults are not written
    plain = NodeConfig.from_payload(payload)
    assert (plain.runtime.dtype, plain.runtime.quantization) == ("auto", "none")
    assert plain.to_payload() == payload  # a snapshot without them keeps its bytes and hash
    payload["runtime"].update(dtype="bfloat16", quantization="int4")
    chosen = NodeConfig.from_payload(payload)
    assert (chosen.runtime.dtype, chosen.runtime.quantization) == ("bfloat16", "int4")
    assert chosen.to_payload() == payload
    assert node_config_hash(chosen) != node_config_hash(plain)
    payload["runtime"].update(dtype="auto", quantization="none")  # written defaults: same
    assert NodeConfig.from_payload(payload) == plain


def test_duplicate_model_and_file_names_are_refused() -> None:
    payload = config_payload()
    payload["models"].append(copy.deepcopy(payload["models"][0]))
    with pytest.raises(PayloadFormatError, match="duplicate model") as info:
        NodeConfig.from_payload(payload)
    assert info.value.path == "models[1].name"
    payload = config_payload()
    files = payload["models"][0]["files"]
    files.append(dict(files[0]))
    with pytest.raises(PayloadFormatError, match="duplicate file path"):
        NodeConfig.from_payload(payload)


@given(st.data())
def test_a_float_anywhere_is_refused_naming_its_path(data: st.DataObject) -> None:
    payload = config_payload()
    leaves: list[str] = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else k)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")
        elif isinstance(value, int) and not isinstance(value, bool):
            leaves.append(path)

    walk(payload, "")
    where = data.draw(st.sampled_from(leaves))
    value = data.draw(st.floats(allow_nan=True) | st.just(1.0))
    with pytest.raises(PayloadFormatError) as info:
        NodeConfig.from_payload(_mutate(payload, where, value))
    assert info.value.path == where
    assert "float" in str(info.value)


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        ("artifacts[0].sha256", "md5:00", "artifacts[0].sha256"),
        ("artifacts[0].name", "../x.whl", "artifacts[0].name"),
        ("artifacts", [], "artifacts"),
        ("agent_version", 2, "agent_version"),
        ("expires_at", NOW - 1, "expires_at"),
    ],
)
def test_release_refusals(path: str, value: Any, where: str) -> None:
    with pytest.raises(PayloadFormatError) as info:
        Release.from_payload(_mutate(release_payload(), path, value))
    assert info.value.path == where


def test_release_duplicate_artifact_is_refused() -> None:
    payload = release_payload()
    payload["artifacts"].append(dict(payload["artifacts"][0]))
    with pytest.raises(PayloadFormatError, match="duplicate artifact"):
        Release.from_payload(payload)


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        ("args.deadline_ms", 1.5, "args.deadline_ms"),
        ("args", [], "args"),
        ("nonce", "short", "nonce"),
        ("action", "Drain!", "action"),
        ("node_id", "", "node_id"),
    ],
)
def test_command_refusals(path: str, value: Any, where: str) -> None:
    with pytest.raises(PayloadFormatError) as info:
        Command.from_payload(_mutate(command_payload(), path, value))
    assert info.value.path == where


def test_grant_sign_and_verify() -> None:
    grant = NodeGrant("acct-1", NODE.public_key, NOW, NOW + 86_400)
    env = sign_grant(grant, ACCOUNT)
    assert env.signed["node_keyid"] == NODE.keyid
    assert verify_grant(Envelope.from_bytes(env.to_bytes()), ACCOUNT.public_key, NOW) == grant


def test_grant_refusals() -> None:
    grant = NodeGrant("acct-1", NODE.public_key, NOW, NOW + 86_400)
    env = sign_grant(grant, ACCOUNT)
    with pytest.raises(UnknownKeyError):
        verify_grant(env, NODE.public_key, NOW)
    with pytest.raises(ExpiredError):
        verify_grant(env, ACCOUNT.public_key, NOW + 86_400)
    with pytest.raises(FutureDatedError):
        verify_grant(env, ACCOUNT.public_key, NOW - 301)
    tampered = Envelope({**env.signed, "account_id": "acct-2"}, env.signatures)
    with pytest.raises(BadSignatureError):
        verify_grant(tampered, ACCOUNT.public_key, NOW)
    mixed = sign_envelope({**env.signed, "node_keyid": ACCOUNT.keyid}, [ACCOUNT])
    with pytest.raises(PayloadFormatError, match="node_keyid"):
        verify_grant(mixed, ACCOUNT.public_key, NOW)
    with pytest.raises(WrongPayloadTypeError):
        verify_grant(sign_receipt(receipt(), ACCOUNT), ACCOUNT.public_key, NOW)


def test_receipt_sign_and_verify() -> None:
    env = sign_receipt(receipt(), NODE)
    assert verify_receipt(env, NODE.public_key) == receipt()
    assert verify_receipt(env, NODE.public_key, expected_node_id=NODE.keyid) == receipt()
    with pytest.raises(PayloadFormatError, match="node_id"):
        verify_receipt(env, NODE.public_key, expected_node_id="someone-else")


def test_receipt_tampering_and_wrong_key() -> None:
    env = sign_receipt(receipt(), NODE)
    more = Envelope({**env.signed, "completion_tokens": 1}, env.signatures)
    with pytest.raises(BadSignatureError):
        verify_receipt(more, NODE.public_key)
    with pytest.raises(UnknownKeyError):
        verify_receipt(env, ACCOUNT.public_key)
    with pytest.raises(PayloadFormatError) as info:
        Receipt.from_payload({**receipt().to_payload(), "prompt_tokens": -1})
    assert info.value.path == "prompt_tokens"
