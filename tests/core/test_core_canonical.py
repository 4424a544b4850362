"""Canonical encoding properties and the known-answer (golden) files of tests/core/golden/."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resultity_core import (
    CanonicalEncodingError,
    Command,
    Envelope,
    PublicKey,
    SecretKey,
    canonical_bytes,
    canonical_digest,
    check_node_config,
    load_key_file,
    load_trusted_root,
    verify_envelope,
    verify_grant,
    verify_receipt,
)

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "golden"


def _load_generator() -> Any:
    script = ROOT / "scripts" / "make_golden.py"
    spec = importlib.util.spec_from_file_location("make_golden", script)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _load_generator()
NOW = GEN.NOW

# ---------------------------------------------------------------- known answers


def test_generator_reproduces_every_golden_file_byte_for_byte() -> None:
    built = GEN.build()
    committed = {p.name for p in GOLDEN.iterdir() if p.name != "README.md"}
    assert committed == set(built)
    for name, data in built.items():
        assert (GOLDEN / name).read_bytes() == data, name


def test_canonical_vectors() -> None:
    vectors = json.loads((GOLDEN / "canonical.json").read_bytes())
    assert len(vectors) == len(GEN.CANONICAL_VALUES)
    for vector in vectors:
        encoded = canonical_bytes(vector["value"])
        assert encoded == vector["canonical"].encode("utf-8")
        assert vector["digest"] == "sha256:" + hashlib.sha256(encoded).hexdigest()
        assert canonical_digest(vector["value"]) == vector["digest"]


def test_canonical_form_details() -> None:
    assert canonical_bytes({"b": 1, "a": [True, None]}) == b'{"a":[true,null],"b":1}'
    assert canonical_bytes("é/😀") == '"é/😀"'.encode()  # raw UTF-8, "/" not escaped
    assert canonical_bytes("\n\u0001") == b'"\\n\\u0001"'
    assert canonical_digest(0) == "sha256:" + hashlib.sha256(b"0").hexdigest()


def test_key_vectors() -> None:
    vectors = json.loads((GOLDEN / "keys.json").read_bytes())
    for name, v in vectors.items():
        key = SecretKey(bytes.fromhex(v["seed"]))
        assert key.public_key.hex == v["public"], name
        assert key.keyid == v["keyid"] == hashlib.sha256(bytes.fromhex(v["public"])).hexdigest()
        assert key.sign(b"abc").hex() == v["sig_of_abc"]
        PublicKey.from_hex(v["public"]).verify(b"", bytes.fromhex(v["sig_of_empty"]))


def test_rfc8032_test_vector_1() -> None:
    # RFC 8032 section 7.1, TEST 1: an answer computed outside this code base.
    seed = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
    key = SecretKey(bytes.fromhex(seed))
    assert key.public_key.hex == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    assert key.sign(b"").hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39"
        "701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )


def test_golden_key_file_still_loads() -> None:
    vectors = json.loads((GOLDEN / "keys.json").read_bytes())
    assert load_key_file(GOLDEN / "root-a.key.json").keyid == vectors["root-a"]["keyid"]


def test_golden_envelopes_still_verify() -> None:
    keys = GEN.keys()
    root = load_trusted_root(Envelope.from_bytes((GOLDEN / "root.json").read_bytes()), NOW)
    snapshot = (GOLDEN / "node_config.json").read_bytes()
    config, digest = check_node_config(snapshot, root, NOW)
    assert digest == (GOLDEN / "node_config.hash").read_text().strip()
    assert config.version == 1
    release = Envelope.from_bytes((GOLDEN / "release.json").read_bytes())
    assert verify_envelope(release, root, "release", expected_type="release")
    command = Envelope.from_bytes((GOLDEN / "command.json").read_bytes())
    verify_envelope(command, root, "network", expected_type="command")
    assert Command.from_payload(command.signed).node_id == keys["node"].keyid
    grant = Envelope.from_bytes((GOLDEN / "grant.json").read_bytes())
    assert verify_grant(grant, keys["account"].public_key, NOW).account_id == "acct-golden"
    receipt = Envelope.from_bytes((GOLDEN / "receipt.json").read_bytes())
    assert verify_receipt(receipt, keys["node"].public_key).completion_tokens == 5


# ---------------------------------------------------------------- properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=25,
)


@given(json_values)
def test_round_trip(value: Any) -> None:
    assert json.loads(canonical_bytes(value)) == value


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=8), st.randoms())
def test_key_order_does_not_matter(value: dict[str, Any], rnd: Any) -> None:
    items = list(value.items())
    rnd.shuffle(items)
    assert canonical_bytes(dict(items)) == canonical_bytes(value)
    assert canonical_digest(dict(items)) == canonical_digest(value)


@given(json_values)
def test_encoding_is_compact_and_stable(value: Any) -> None:
    encoded = canonical_bytes(value)
    assert canonical_bytes(json.loads(encoded)) == encoded
    assert json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    ) == encoded


def _paths(value: Any, path: str = "") -> list[str]:
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, f"{path}[{i}]")
    return out


def _replace(value: Any, target: str, new: Any, path: str = "") -> Any:
    if path == target:
        return new
    if isinstance(value, dict):
        return {k: _replace(v, target, new, f"{path}.{k}" if path else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace(v, target, new, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


ident = st.text(alphabet="abcdefgh", min_size=1, max_size=4)
plain = st.recursive(
    st.integers() | st.booleans(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(ident, children, max_size=4),
    max_leaves=15,
)


@given(plain, st.data())
def test_floats_are_refused_naming_the_path(value: Any, data: st.DataObject) -> None:
    target = data.draw(st.sampled_from(_paths(value)))
    bad = data.draw(st.floats() | st.sampled_from([0.0, 1.0, float("nan"), float("inf")]))
    with pytest.raises(CanonicalEncodingError) as info:
        canonical_bytes(_replace(value, target, bad))
    assert info.value.path == target
    assert "float" in str(info.value)


@given(plain, st.data())
def test_non_string_keys_are_refused_naming_the_path(value: Any, data: st.DataObject) -> None:
    target = data.draw(st.sampled_from(_paths(value)))
    bad_key = data.draw(st.integers() | st.none() | st.booleans() | st.tuples(st.integers()))
    with pytest.raises(CanonicalEncodingError) as info:
        canonical_bytes(_replace(value, target, {bad_key: 1}))
    assert info.value.path == target
    assert "keys must be strings" in str(info.value)


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"models": [{}, {}, {"files": [{"size": 1.5}]}]}, "models[2].files[0].size"),
        ({"a": {1, 2}}, "a"),
        ([b"bytes"], "[0]"),
        ({"s": "lone \ud800 surrogate"}, "s"),
    ],
)
def test_non_json_values_are_refused_naming_the_path(value: Any, path: str) -> None:
    with pytest.raises(CanonicalEncodingError) as info:
        canonical_bytes(value)
    assert info.value.path == path
