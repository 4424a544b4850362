"""``resultity snapshot``: write, sign and verify NodeConfig snapshots."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from resultity_core import (
    DEFAULT_SKEW,
    NodeConfig,
    PayloadFormatError,
    ResultityError,
    check_node_config,
    example_node_config,
    sign_envelope,
)

from ._cmd_trust import (
    current_time,
    load_envelope_file,
    load_keys,
    load_trust,
    now_arg,
)
from ._common import CLIError, add_command_group, load_json_strict, write_json_file

__all__ = ["register"]

_HASH = re.compile(r"sha256:[0-9a-f]{64}")

_DESCRIPTION = """\
NodeConfig snapshots: the signed rules nodes run under (approved models with per-file sha256
and size, runtime parameters, network endpoints and timeouts, participation and resource
limits, prices in micro-credits per 1,000 tokens). Integers only: times in unix seconds,
durations in milliseconds, sizes in bytes. The node_config_hash printed by `sign` and `verify`
is sha256 of the payload's canonical JSON: the value the network publishes and nodes check.

typical flow:
  resultity snapshot example > config.json      # edit it
  resultity snapshot sign --trust trust.json --key config.key config.json --out snapshot.json
  resultity snapshot verify --trust trust.json snapshot.json
"""

_VERIFY_DESCRIPTION = """\
Check SNAPSHOT with a node's rules: the trust root is valid and unexpired; the hash is the
expected one (--hash); a threshold of the trust root's config keys signed it; the payload is a
valid NodeConfig; it is not expired; it is not issued further in the future than --skew; its
version is not lower than --applied-version. Exit 0 printing the hash and version; exit 1
printing one line that says why not.
"""


def register(subparsers: Any) -> None:
    """Add ``snapshot example|sign|verify`` to the CLI."""
    sub = add_command_group(
        subparsers, "snapshot", help="write, sign and verify NodeConfig snapshots",
        description=_DESCRIPTION)

    example = sub.add_parser(
        "example", help="print a valid example NodeConfig payload (JSON)",
        description="Print a valid NodeConfig payload as JSON: issued now, expiring in 30 "
        "days, with one example model entry whose file digest is a placeholder to replace.",
    )
    example.add_argument("--version", type=int, default=1, help="snapshot version (default 1)")
    now_arg(example)
    example.set_defaults(handler=_example)

    sign = sub.add_parser(
        "sign", help="sign a NodeConfig payload and print its node_config_hash",
        description="Validate the NodeConfig payload in PAYLOAD, sign it with each --key, "
        "check the result against the config role of --trust (so a wrong or missing key is "
        "reported before anything is written), write the signed snapshot to --out and print "
        "its node_config_hash.",
    )
    sign.add_argument("--trust", required=True, metavar="TRUST", help="trust root file")
    sign.add_argument(
        "--key", action="append", required=True, metavar="K",
        help="key file of a config key (repeat to reach the threshold)",
    )
    sign.add_argument("payload", metavar="PAYLOAD", help="NodeConfig payload (JSON file)")
    sign.add_argument("--out", required=True, metavar="PATH", help="where to write the snapshot")
    _skew_arg(sign)
    now_arg(sign)
    sign.set_defaults(handler=_sign)

    verify = sub.add_parser(
        "verify", help="check a signed snapshot with the node's rules",
        description=_VERIFY_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("--trust", required=True, metavar="TRUST", help="trust root file")
    verify.add_argument("--hash", metavar="sha256:...", help="the node_config_hash expected")
    verify.add_argument(
        "--applied-version", type=int, metavar="N",
        help="version the node has applied; a lower one is refused as a rollback",
    )
    verify.add_argument("snapshot", metavar="SNAPSHOT", help="signed snapshot (JSON file)")
    _skew_arg(verify)
    now_arg(verify)
    verify.set_defaults(handler=_verify)


def _skew_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--skew", type=int, default=DEFAULT_SKEW, metavar="SECONDS",
        help=f"allowed clock skew for issued_at in the future (default {DEFAULT_SKEW})",
    )


def _example(args: argparse.Namespace) -> int:
    if args.version < 1:
        raise CLIError("--version must be at least 1")
    config = example_node_config(now=current_time(args), version=args.version)
    print(json.dumps(config.to_payload(), indent=2, sort_keys=True))
    return 0


def _sign(args: argparse.Namespace) -> int:
    now = current_time(args)
    root = load_trust(args.trust, now)
    payload = load_json_strict(args.payload, "payload")
    try:
        NodeConfig.from_payload(payload)
    except PayloadFormatError as exc:
        raise CLIError(f"payload {args.payload}: not a valid NodeConfig: {exc}") from None
    keys = load_keys(args.key)
    envelope = sign_envelope(payload, keys)
    try:
        _config, digest = check_node_config(envelope, root, now, skew=args.skew)
    except ResultityError as exc:
        raise CLIError(f"signed snapshot would be refused by nodes: {exc}") from None
    write_json_file(args.out, envelope.to_payload(), mode=0o644)
    print(digest)
    return 0


def _verify(args: argparse.Namespace) -> int:
    if args.hash is not None and not _HASH.fullmatch(args.hash):
        raise CLIError(f"--hash {args.hash}: expected sha256: followed by 64 lowercase hex digits")
    now = current_time(args)
    root = load_trust(args.trust, now)
    envelope = load_envelope_file(args.snapshot, "snapshot")
    try:
        config, digest = check_node_config(
            envelope, root, now, expected_hash=args.hash,
            applied_version=args.applied_version, skew=args.skew,
        )
    except ResultityError as exc:
        raise CLIError(f"snapshot {args.snapshot} rejected: {type(exc).__name__}: {exc}") from None
    print(f"{digest} version {config.version}")
    return 0
