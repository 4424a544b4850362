"""``resultity cloud serve``: run the public OpenAI-compatible API."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._cmd_network import (
    add_log_arg,
    add_network_client_args,
    read_service_token,
    run_server,
    setup_logging,
    termination_signals,
)
from ._common import CLIError, add_command_group

__all__ = ["register"]

_DESCRIPTION = """\
The Cloud is Resultity's public interface: an OpenAI-compatible HTTP API (/v1/models,
/v1/chat/completions, /v1/completions, streaming or not; /health; /metrics). It checks the
Bearer API key of each request (see `resultity account create`), reserves credits for the
worst case, forwards the job to the Network and streams the tokens back. Point the official
openai client at it with base_url=http://HOST:PORT/v1.
"""


def register(subparsers: Any) -> None:
    """Add ``cloud serve`` to the CLI."""
    sub = add_command_group(subparsers, "cloud", help="run the public OpenAI-compatible API",
                            description=_DESCRIPTION)
    serve = sub.add_parser(
        "serve", help="run the Cloud until Ctrl-C",
        description="Serve the OpenAI-compatible API on HOST:PORT until SIGINT/SIGTERM "
        "(graceful: open streams finish), forwarding jobs to the Network at --network. "
        "The Network must be running: the Cloud checks it at start.")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1; use 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: free)")
    add_network_client_args(serve)
    serve.add_argument("--auth-cache-ttl", type=float, default=30.0, metavar="SECONDS",
                       help="how long a valid API key is remembered (default 30; 0: never)")
    add_log_arg(serve)
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from resultity_servers._http import HTTPClient, HTTPClientError
    from resultity_servers.cloud import CloudSettings, running_cloud

    setup_logging(args.log_level)
    token = read_service_token(args.service_token_file)
    if args.auth_cache_ttl < 0:
        raise CLIError("--auth-cache-ttl must not be negative")
    settings = CloudSettings(host=args.host, port=args.port, network_url=args.network,
                             service_token=token, auth_cache_ttl_s=args.auth_cache_ttl)

    async def main() -> str:
        try:
            async with HTTPClient(args.network, timeout_s=5.0) as probe:
                await probe.request("GET", "/network/v1/health")
        except HTTPClientError as exc:
            raise CLIError(f"cannot reach the network at {args.network}: {exc} (start "
                           "`resultity network serve` first, or pass --network)") from None
        async with running_cloud(settings) as (server, _app):
            with termination_signals() as wait:
                print(f"resultity cloud listening on http://{args.host}:{server.port}/v1 "
                      f"(network {args.network})", flush=True)
                return await wait()

    name = run_server(main, args.host, args.port, "cloud")
    print(f"resultity cloud stopped ({name})", file=sys.stderr)
    return 0
