"""``resultity demo``: a whole network on this machine, answering one sample request."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import CLIError

__all__ = ["register"]

_DESCRIPTION = """\
Start everything on 127.0.0.1 in one process: the Network (SQLite in the data directory), the
Cloud (the OpenAI-compatible API) and N nodes, each an Agent with its Runtime child process.
The first run creates keys, a trust root and the local model in the data directory (later runs
reuse them), publishes a signed NodeConfig approving the model (sha256 and size of every file),
creates an account with credits and an API key, waits for a node (progress on stderr), prints

  Resultity cloud ready at http://127.0.0.1:PORT/v1

and the API key, streams the answer to one sample chat request through the whole path, and
keeps serving until Ctrl-C (graceful shutdown). With --once it exits 0 after the sample.

Then, from another terminal:
  OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=<key> python examples/chat_openai.py
"""


def _default_dir() -> str:
    from resultity_servers.demo import default_demo_dir

    return str(default_demo_dir())


def register(subparsers: Any) -> None:
    """Add ``demo`` to the CLI."""
    parser = subparsers.add_parser(
        "demo", help="run a network, a cloud and nodes on this machine",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000,
                        help="the Cloud's port (default 8000; 0 picks a free one)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="use this API key (must start with rk-) instead of a generated "
                        "one")
    parser.add_argument("--nodes", type=int, default=1, metavar="N",
                        help="nodes to start (default 1)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="where keys, model and state live (default "
                        "$XDG_CACHE_HOME/resultity/demo, i.e. ~/.cache/resultity/demo)")
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help="model preset (default: demo if installed, else tiny)")
    parser.add_argument("--once", action="store_true",
                        help="exit with status 0 after the sample request")
    parser.add_argument("--ready-timeout", type=float, default=600.0, metavar="SECONDS",
                        help="give up when no node is ready after this long (default 600)")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="CPU threads of each node's Runtime (default: cores / nodes)")
    parser.add_argument("--device", default="cpu",
                        help="torch device of the nodes' Runtimes (default cpu; e.g. cuda)")
    parser.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    import logging
    import os
    import sys

    from resultity_servers.demo import DemoOptions, run_demo

    from ._cmd_network import run_server

    if args.nodes < 1:
        raise CLIError("--nodes must be at least 1", status=2)
    if not 0 <= args.port <= 65535:
        raise CLIError("--port must be between 0 and 65535", status=2)
    if args.api_key is not None and not args.api_key.startswith("rk-"):
        raise CLIError("--api-key must start with rk- (the network's API key prefix)", status=2)
    threads = args.threads or max(1, (os.cpu_count() or 2) // args.nodes)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(name)s %(levelname)s: %(message)s")
    options = DemoOptions(data_dir=args.data_dir or _default_dir(), port=args.port,
                          nodes=args.nodes, api_key=args.api_key, preset=args.preset,
                          runtime_threads=threads, device=args.device)

    async def main() -> int:
        try:
            return await run_demo(options, once=args.once, ready_timeout_s=args.ready_timeout)
        except TimeoutError:
            raise CLIError(f"no node became ready within {args.ready_timeout:g} s (see the "
                           "messages above)") from None
        except (RuntimeError, ValueError) as exc:
            raise CLIError(str(exc)) from None

    try:
        return run_server(main, options.host, args.port, "demo")
    except CLIError as exc:
        if "already in use" in str(exc):
            raise CLIError(f"port {args.port} is already in use (another demo or cloud?); "
                           "pass --port N, or --port 0 for a free one") from None
        raise
