"""Generate the known-answer files under tests/core/golden/ (run once; commit the output).

Every input is fixed (key seeds, times, payloads) and Ed25519 is deterministic, so running this
again with unchanged code rewrites identical bytes. tests/core/test_core_canonical.py imports
``build()`` and checks that the current code reproduces each committed file byte for byte: a
change in canonical encoding, key ids, signing or a format's canonical form fails that test.
Regenerate only for a deliberate, documented format change:

    python scripts/make_golden.py [--check]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from resultity_core import (
    Command,
    NodeGrant,
    Receipt,
    Release,
    SecretKey,
    canonical_bytes,
    canonical_digest,
    example_node_config,
    make_root,
    save_key_file,
    sign_envelope,
    sign_grant,
    sign_receipt,
)

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "core" / "golden"
NOW = 1_700_000_000
DAY = 86_400

#: Fixed seeds: name -> 32-byte seed. Never reuse these keys for anything real.
SEEDS = {
    "root-a": bytes(range(32)),
    "root-b": bytes(range(32, 64)),
    "config-a": bytes(range(64, 96)),
    "config-b": bytes(range(96, 128)),
    "release": bytes(range(128, 160)),
    "network": bytes(range(160, 192)),
    "account": bytes(range(192, 224)),
    "node": bytes(range(224, 256)),
}

CANONICAL_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    2**63,
    "",
    "plain",
    "quote\" backslash\\ slash/ tab\t newline\n nul\u0000 del\u007f",
    "é ü ß 日本 😀",
    [],
    {},
    [1, "two", [3], {"four": 4}],
    {"b": 1, "a": 2, "A": 3, "_type": "x", "aa": 4, "é": 5, "😀": 6, "z": {"y": [], "x": {}}},
]


def keys() -> dict[str, SecretKey]:
    """Return the fixed test keys by name."""
    return {name: SecretKey(seed) for name, seed in SEEDS.items()}


def _bytes(value: Any) -> bytes:
    return canonical_bytes(value)


def build() -> dict[str, bytes]:
    """Return the golden files' names and exact contents."""
    k = keys()
    files: dict[str, bytes] = {}
    files["canonical.json"] = _bytes(
        [
            {
                "value": v,
                "canonical": canonical_bytes(v).decode("utf-8"),
                "digest": canonical_digest(v),
            }
            for v in CANONICAL_VALUES
        ]
    )
    files["keys.json"] = _bytes(
        {
            name: {
                "seed": key.seed.hex(),
                "public": key.public_key.hex,
                "keyid": key.keyid,
                "sig_of_empty": key.sign(b"").hex(),
                "sig_of_abc": key.sign(b"abc").hex(),
            }
            for name, key in k.items()
        }
    )
    root = make_root(
        version=1,
        expires_at=NOW + 365 * DAY,
        role_keys={
            "root": [k["root-a"].public_key, k["root-b"].public_key],
            "config": [k["config-a"].public_key, k["config-b"].public_key],
            "release": [k["release"].public_key],
            "network": [k["network"].public_key],
        },
        thresholds={"root": 2, "config": 2},
    )
    files["root.json"] = sign_envelope(root.to_payload(), [k["root-a"], k["root-b"]]).to_bytes()
    config = example_node_config(now=NOW, version=1)
    files["node_config.json"] = sign_envelope(
        config.to_payload(), [k["config-a"], k["config-b"]]
    ).to_bytes()
    release = Release.from_payload(
        {
            "_type": "release",
            "version": 1,
            "agent_version": "0.1.0",
            "runtime_version": "0.1.0",
            "artifacts": [
                {"name": "resultity-0.1.0-py3-none-any.whl",
                 "sha256": canonical_digest("wheel"), "size": 123456}
            ],
            "issued_at": NOW,
            "expires_at": NOW + 30 * DAY,
        }
    )
    files["release.json"] = sign_envelope(release.to_payload(), [k["release"]]).to_bytes()
    node_id = k["node"].keyid
    cmd = Command(node_id, "golden-nonce-0001", NOW, NOW + 300, "drain", {"deadline_ms": 60000})
    files["command.json"] = sign_envelope(cmd.to_payload(), [k["network"]]).to_bytes()
    grant = NodeGrant("acct-golden", k["node"].public_key, NOW, NOW + 365 * DAY)
    files["grant.json"] = sign_grant(grant, k["account"]).to_bytes()
    receipt = Receipt(
        job_id="job-golden-1",
        node_id=node_id,
        model="tiny",
        request_hash=canonical_digest({"prompt": "hi"}),
        output_hash=canonical_digest("hello"),
        prompt_tokens=3,
        completion_tokens=5,
        issued_at=NOW,
    )
    files["receipt.json"] = sign_receipt(receipt, k["node"]).to_bytes()
    files["node_config.hash"] = (canonical_digest(config.to_payload()) + "\n").encode()
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "root-a.key.json"
        save_key_file(k["root-a"], path, overwrite=True)
        files["root-a.key.json"] = path.read_bytes()
    return files


def main(argv: list[str]) -> int:
    """Write the files (or with --check, compare them); return the exit status."""
    check = "--check" in argv
    status = 0
    for name, data in build().items():
        path = GOLDEN / name
        if check:
            if not path.exists() or path.read_bytes() != data:
                print(f"differs: {path}")
                status = 1
        else:
            GOLDEN.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            print(f"wrote {path}")
    if not check:
        (GOLDEN / "README.md").write_text(
            "Known-answer files written by `scripts/make_golden.py` (fixed seeds and times).\n"
            "Tests check the current code reproduces them byte for byte. Do not edit by hand.\n"
            "The keys in keys.json and root-a.key.json are public test keys: never trust them.\n"
        )
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
