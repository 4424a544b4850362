"""``resultity trust``: create a signed trust root; helpers to load roots, keys and envelopes."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from resultity_core import (
    ROLES,
    ROOT_TYPE,
    Envelope,
    MalformedEnvelopeError,
    PublicKey,
    ResultityError,
    SecretKey,
    TrustRoot,
    load_key_file,
    load_trusted_root,
    make_root,
    rotate_root,
    sign_envelope,
    verify_envelope,
)

from ._common import CLIError, add_command_group, load_json_strict, write_json_file

__all__ = [
    "current_time",
    "load_envelope_file",
    "load_keys",
    "load_trust",
    "now_arg",
    "register",
]

_DAY = 86_400

_DESCRIPTION = """\
Trust roots. A trust root is a signed JSON document listing the Ed25519 keys allowed to sign
for each role and how many distinct keys must sign (the threshold):
  root     signs trust roots (including their rotation to a new version),
  config   signs NodeConfig snapshots,
  release  signs Release manifests,
  network  signs commands to nodes.
"""

_INIT_EPILOG = """\
K are key files (see `resultity keys generate`); their public keys go into the root and the
root keys sign it. Thresholds default to 1. The release and network roles default to the
root keys when no --release-key / --network-key is given. The command prints the root's
digest, which a node may pin instead of trusting the root on first use.

example:
  resultity keys generate root.key && resultity keys generate config.key
  resultity trust init --out trust.json --root-key root.key --config-key config.key
"""


def now_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--now UNIX`` (the time checks are made at; default the current time)."""
    parser.add_argument(
        "--now", type=int, metavar="UNIX", default=None,
        help="check times against this unix time instead of the clock (for tests and audits)",
    )


def current_time(args: argparse.Namespace) -> int:
    """Return ``args.now`` or the current unix time."""
    return int(time.time()) if args.now is None else int(args.now)


def load_envelope_file(path: str, what: str) -> Envelope:
    """Return the signed envelope in the JSON file ``path``; CLIError names the file."""
    obj = load_json_strict(path, what)
    try:
        return Envelope.from_payload(obj)
    except MalformedEnvelopeError as exc:
        raise CLIError(f"{what} {path}: not a signed envelope: {exc}") from None


def load_trust(path: str, now: int) -> TrustRoot:
    """Return the trust root in ``path`` after checking its self-signature and expiry."""
    env = load_envelope_file(path, "trust root")
    try:
        return load_trusted_root(env, now)
    except ResultityError as exc:
        raise CLIError(f"trust root {path}: {exc}") from None


def load_keys(paths: list[str]) -> list[SecretKey]:
    """Load each key file (KeyFileError names a bad one); duplicates are dropped."""
    keys: dict[str, SecretKey] = {}
    for path in paths:
        key = load_key_file(path)
        keys.setdefault(key.keyid, key)
    return list(keys.values())


def register(subparsers: Any) -> None:
    """Add ``trust init`` and ``trust rotate`` to the CLI."""
    sub = add_command_group(subparsers, "trust", help="create trust roots",
                            description=_DESCRIPTION)
    init = sub.add_parser(
        "init", help="write a new signed trust root (version 1)",
        description="Create version 1 of a trust root from key files and sign it with the "
        "root keys.", epilog=_INIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    init.add_argument("--out", required=True, metavar="PATH", help="where to write the root")
    init.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    for role, required in (("root", True), ("config", True), ("release", False),
                           ("network", False)):
        init.add_argument(
            f"--{role}-key", action="append", required=required, default=[], metavar="K",
            help=f"key file of a {role} key (repeat for several)"
            + ("" if required else "; default: the root keys"),
        )
        init.add_argument(
            f"--{role}-threshold", type=int, default=1, metavar="N",
            help=f"distinct {role} keys that must sign (default 1)",
        )
    init.add_argument(
        "--expires-in", type=int, default=365, metavar="DAYS",
        help="days until the root expires (default 365)",
    )
    now_arg(init)
    init.set_defaults(handler=_init)

    rotate = sub.add_parser(
        "rotate", help="write the next version of a trust root (key rotation)",
        description="Write version N+1 of the trust root in --current, signed by the current "
        "root keys (--old-key) and by the new root keys, and check it exactly as a node will "
        "(rotate_root) before writing. A role given no --ROLE-key keeps its current keys; a "
        "threshold not given stays as it is (or 1 for a role given new keys).",
        epilog="example (replace the config key):\n  resultity trust rotate --current trust.json"
        " --out trust-v2.json --old-key root.key --config-key new-config.key",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rotate.add_argument("--current", required=True, metavar="TRUST", help="the current root")
    rotate.add_argument("--out", required=True, metavar="PATH", help="where to write the new root")
    rotate.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    rotate.add_argument(
        "--old-key", action="append", required=True, default=[], metavar="K",
        help="key file of a current root key (repeat to reach its threshold)",
    )
    for role in ("root", "config", "release", "network"):
        rotate.add_argument(
            f"--{role}-key", action="append", default=[], metavar="K",
            help=f"key file of a new {role} key (repeat); default: keep the current ones",
        )
        rotate.add_argument(
            f"--{role}-threshold", type=int, default=None, metavar="N",
            help=f"distinct {role} keys that must sign",
        )
    rotate.add_argument(
        "--expires-in", type=int, default=365, metavar="DAYS",
        help="days until the new root expires (default 365)",
    )
    now_arg(rotate)
    rotate.set_defaults(handler=_rotate)


def _init(args: argparse.Namespace) -> int:
    if Path(args.out).exists() and not args.force:
        raise CLIError(f"{args.out} already exists; pass --force to replace it")
    if args.expires_in < 1:
        raise CLIError("--expires-in must be at least 1 day")
    now = current_time(args)
    root_keys = load_keys(args.root_key)
    role_keys = {
        "root": root_keys,
        "config": load_keys(args.config_key),
        "release": load_keys(args.release_key) if args.release_key else root_keys,
        "network": load_keys(args.network_key) if args.network_key else root_keys,
    }
    thresholds = {role: _threshold(args, role, len(keys), 1) for role, keys in role_keys.items()}
    root = make_root(
        version=1,
        expires_at=now + args.expires_in * _DAY,
        role_keys={role: [k.public_key for k in keys] for role, keys in role_keys.items()},
        thresholds=thresholds,
    )
    envelope = sign_envelope(root.to_payload(), root_keys)
    load_trusted_root(envelope, now)  # self-check before writing
    write_json_file(args.out, envelope.to_payload(), mode=0o644)
    print(f"wrote trust root v1 to {args.out}; digest {root.digest()}")
    return 0


def _threshold(args: argparse.Namespace, role: str, count: int, default: int) -> int:
    threshold = getattr(args, f"{role}_threshold")
    threshold = default if threshold is None else threshold
    if not 1 <= threshold <= count:
        raise CLIError(
            f"--{role}-threshold {threshold}: must be between 1 and the {count} "
            f"distinct {role} key(s)"
        )
    return int(threshold)


def _rotate(args: argparse.Namespace) -> int:
    if Path(args.out).exists() and not args.force:
        raise CLIError(f"{args.out} already exists; pass --force to replace it")
    if args.expires_in < 1:
        raise CLIError("--expires-in must be at least 1 day")
    now = current_time(args)
    env = load_envelope_file(args.current, "trust root")
    try:  # the current root may have expired: rotating is how one recovers from that
        current = TrustRoot.from_payload(env.signed)
        verify_envelope(env, current, "root", expected_type=ROOT_TYPE)
    except ResultityError as exc:
        raise CLIError(f"trust root {args.current}: {exc}") from None
    new_public: dict[str, list[PublicKey]] = {}
    thresholds: dict[str, int] = {}
    signers = load_keys(args.old_key)
    for role in ROLES:
        given = getattr(args, f"{role}_key")
        if given:
            keys = load_keys(given)
            if role == "root":
                signers += keys
            new_public[role] = [k.public_key for k in keys]
            thresholds[role] = _threshold(args, role, len(keys), 1)
        else:
            old = current.role(role)
            new_public[role] = [current.keys[kid] for kid in old.keyids]
            thresholds[role] = _threshold(args, role, len(old.keyids), old.threshold)
    new = make_root(
        version=current.version + 1,
        expires_at=now + args.expires_in * _DAY,
        role_keys=new_public,
        thresholds=thresholds,
    )
    envelope = sign_envelope(new.to_payload(), signers)
    try:
        rotate_root(current, envelope, now)
    except ResultityError as exc:
        raise CLIError(f"the new root would be refused by nodes: {exc}") from None
    write_json_file(args.out, envelope.to_payload(), mode=0o644)
    print(f"wrote trust root v{new.version} to {args.out}; digest {new.digest()}")
    return 0
