"""``resultity keys``: create and inspect Ed25519 key files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from resultity_core import generate_key, load_key_file, save_key_file

from ._common import CLIError, add_command_group

__all__ = ["register"]

_DESCRIPTION = """\
Ed25519 key files. A key file is JSON holding the secret seed, the public key and the key id
(the hex SHA-256 of the public key); it is written with permissions 0600. Keep it secret: it
signs trust roots, snapshots, grants or receipts, depending on the role it is given.
"""


def register(subparsers: Any) -> None:
    """Add ``keys generate`` and ``keys show`` to the CLI."""
    sub = add_command_group(subparsers, "keys", help="create and inspect Ed25519 key files",
                            description=_DESCRIPTION)

    gen = sub.add_parser(
        "generate",
        help="write a new key file and print its key id",
        description="Generate a new Ed25519 key, write it to PATH (mode 0600, atomically) "
        "and print its key id on standard output.",
    )
    gen.add_argument("path", metavar="PATH", help="where to write the key file")
    gen.add_argument(
        "--force", action="store_true", help="overwrite PATH if it exists (the old key is lost)"
    )
    gen.set_defaults(handler=_generate)

    show = sub.add_parser(
        "show",
        help="print a key file's key id and public key (never the secret)",
        description="Load and check the key file at PATH and print, as JSON, its key id and "
        'public key ({"keyid": ..., "public": ...}); the secret seed is not printed.',
    )
    show.add_argument("path", metavar="PATH", help="the key file")
    show.set_defaults(handler=_show)


def _generate(args: argparse.Namespace) -> int:
    if not args.force and Path(args.path).exists():
        raise CLIError(f"{args.path} already exists; pass --force to replace it (losing that key)")
    key = generate_key()
    save_key_file(key, args.path, overwrite=args.force)
    print(key.keyid)
    return 0


def _show(args: argparse.Namespace) -> int:
    key = load_key_file(args.path)
    print(json.dumps({"keyid": key.keyid, "public": key.public_key.hex}, indent=2))
    return 0
