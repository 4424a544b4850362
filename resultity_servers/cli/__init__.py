"""The ``resultity`` command line.

Each sub-command lives in a module named ``_cmd_<name>.py`` beside this file that defines
``register(subparsers) -> None``; the parser it adds sets ``handler=fn(args) -> int`` with
``set_defaults``. Modules are found by name, so adding a command touches no shared list.
Command modules import heavy dependencies (torch, the servers) inside their handlers, so that
``resultity --help`` stays fast and works without the optional extras.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from ._common import CLIError

__all__ = ["CLIError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every discovered sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="resultity",
        description=(
            "Resultity: an OpenAI-compatible public inference network. "
            "Run `resultity COMMAND --help` for the options of a command."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = sorted(
        info.name
        for info in pkgutil.iter_modules(__path__)
        if info.name.startswith("_cmd_")
    )
    for name in names:
        module = importlib.import_module(f"{__name__}.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit status (0 ok, 1 failure, 2 usage)."""
    from resultity_core import ResultityError

    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except CLIError as exc:
        print(f"resultity: error: {exc}", file=sys.stderr)
        return exc.status
    except ResultityError as exc:
        print(f"resultity: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("resultity: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
