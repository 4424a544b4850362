"""Ed25519 keys and key files: generation, ids, signing, and every way a key file goes wrong."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from resultity_core import (
    BadSignatureError,
    KeyFileError,
    PayloadFormatError,
    PublicKey,
    SecretKey,
    generate_key,
    key_id,
    load_key_file,
    save_key_file,
)

SEED = bytes(range(32))


def test_key_id_is_plain_hex_sha256_of_raw_public_key() -> None:
    key = SecretKey(SEED)
    raw = key.public_key.raw
    assert len(raw) == 32
    assert key.keyid == hashlib.sha256(raw).hexdigest() == key_id(raw)
    assert not key.keyid.startswith("sha256:")


def test_sign_and_verify_round_trip_and_determinism() -> None:
    key = SecretKey(SEED)
    sig = key.sign(b"hello")
    assert sig == key.sign(b"hello")
    assert len(sig) == 64
    key.public_key.verify(b"hello", sig)
    with pytest.raises(BadSignatureError):
        key.public_key.verify(b"hellp", sig)
    with pytest.raises(BadSignatureError):
        generate_key().public_key.verify(b"hello", sig)


def test_generate_gives_distinct_keys_and_repr_hides_seed() -> None:
    a, b = generate_key(), generate_key()
    assert a.keyid != b.keyid
    assert a.seed.hex() not in repr(a)
    assert a.keyid in repr(a)


def test_public_key_payload_round_trip_and_refusals() -> None:
    pub = SecretKey(SEED).public_key
    assert PublicKey.from_payload(pub.to_payload()) == pub
    with pytest.raises(PayloadFormatError, match=r"k\.keytype"):
        PublicKey.from_payload({"keytype": "rsa", "public": pub.hex}, "k")
    with pytest.raises(PayloadFormatError, match=r"k\.public"):
        PublicKey.from_payload({"keytype": "ed25519", "public": pub.hex[:-2]}, "k")
    with pytest.raises(PayloadFormatError, match=r"k\.public"):
        PublicKey.from_payload({"keytype": "ed25519", "public": pub.hex.upper()}, "k")
    with pytest.raises(PayloadFormatError, match=r"k\.extra"):
        PublicKey.from_payload({"keytype": "ed25519", "public": pub.hex, "extra": 1}, "k")


def test_save_writes_0600_and_load_round_trips(tmp_path: Path) -> None:
    key = SecretKey(SEED)
    path = tmp_path / "k.json"
    save_key_file(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key_file(path) == key
    obj = json.loads(path.read_text())
    assert obj["keyid"] == key.keyid
    assert obj["public"] == key.public_key.hex
    assert [p.name for p in tmp_path.iterdir()] == ["k.json"]  # no temp file left behind


def test_save_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    save_key_file(SecretKey(SEED), path)
    other = generate_key()
    with pytest.raises(KeyFileError, match="already exists"):
        save_key_file(other, path)
    assert load_key_file(path).keyid == SecretKey(SEED).keyid
    save_key_file(other, path, overwrite=True)
    assert load_key_file(path) == other
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_save_into_missing_directory_is_a_key_file_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot write"):
        save_key_file(SecretKey(SEED), tmp_path / "nope" / "k.json")


def _good(tmp_path: Path) -> dict[str, str]:
    save_key_file(SecretKey(SEED), tmp_path / "good.json")
    obj: dict[str, str] = json.loads((tmp_path / "good.json").read_text())
    return obj


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda o: {**o, "_type": "something-else"}, "not an Ed25519 secret key file"),
        (lambda o: {**o, "keytype": "rsa"}, "unsupported keytype"),
        (lambda o: {**o, "seed": o["seed"][:-4]}, "corrupt"),
        (lambda o: {**o, "seed": "zz" + o["seed"][2:]}, "corrupt"),
        (lambda o: {**o, "seed": "ff" + o["seed"][2:]}, "public key does not match"),
        (lambda o: {**o, "keyid": "0" * 64}, "keyid does not match"),
        (lambda o: {k: v for k, v in o.items() if k != "seed"}, "corrupt"),
        (lambda o: [o], "expected a JSON object"),
    ],
)
def test_load_refuses_wrong_or_corrupt_content(tmp_path: Path, mutate, message) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(mutate(_good(tmp_path))))
    with pytest.raises(KeyFileError, match=message) as info:
        load_key_file(path)
    assert str(path) in str(info.value)


def test_load_refuses_truncated_not_json_binary_missing_and_directory(tmp_path: Path) -> None:
    save_key_file(SecretKey(SEED), tmp_path / "good.json")
    data = (tmp_path / "good.json").read_bytes()
    cases = {
        "trunc.json": data[: len(data) // 2],
        "text.json": b"not json at all",
        "bin.json": os.urandom(8) + b"\xff\xfe",
        "empty.json": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(KeyFileError, match="not a JSON key file") as info:
            load_key_file(tmp_path / name)
        assert name in str(info.value)
    with pytest.raises(KeyFileError, match="no such file"):
        load_key_file(tmp_path / "missing.json")
    with pytest.raises(KeyFileError, match="is a directory"):
        load_key_file(tmp_path)
