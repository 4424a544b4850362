"""Helpers shared by the CLI's command modules."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["CLIError", "add_command_group", "load_json_strict", "write_json_file"]


class CLIError(Exception):
    """A user-facing failure: printed as one line, no traceback; ``status`` is the exit code."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def add_command_group(subparsers: Any, name: str, *, help: str, description: str) -> Any:
    """Add command ``name`` whose actions are sub-commands; return their subparsers.

    ``resultity NAME`` without an action prints the command's help and exits with status 2.
    """
    parser = subparsers.add_parser(name, help=help, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=lambda _args: _usage(parser))
    return parser.add_subparsers(dest=f"{name}_command", metavar="ACTION")


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def load_json_strict(path: str | Path, what: str) -> Any:
    """Parse a JSON file strictly (no duplicate keys, floats or NaN); CLIError names the file."""
    from resultity_core import MalformedEnvelopeError, parse_json_strict

    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise CLIError(f"{what} {p}: no such file") from None
    except IsADirectoryError:
        raise CLIError(f"{what} {p}: is a directory") from None
    except OSError as exc:
        raise CLIError(f"{what} {p}: {exc.strerror or exc}") from None
    try:
        return parse_json_strict(data)
    except MalformedEnvelopeError as exc:
        raise CLIError(f"{what} {p}: {exc.reason}") from None


def write_json_file(path: str | Path, value: Any, *, mode: int | None = None) -> None:
    """Write ``value`` as indented JSON atomically (temp file, then rename).

    ``mode`` sets the permissions (default 0644). Raises CLIError naming the file on failure.
    """
    p = Path(path)
    if p.parent and not p.parent.exists():
        raise CLIError(f"cannot write {p}: directory {p.parent} does not exist")
    tmp = p.with_name(f".{p.name}.tmp")
    data = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if mode is None else mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except OSError as exc:
        raise CLIError(f"cannot write {p}: {exc.strerror or exc}") from None
