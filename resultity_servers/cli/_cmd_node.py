"""``resultity node serve``: run a node (the Agent and its Runtime child processes)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ._cmd_network import DEFAULT_NETWORK_URL, add_log_arg, data_home, setup_logging
from ._common import CLIError, add_command_group

__all__ = ["register"]

_DESCRIPTION = """\
A node runs models for the network. Its Agent dials out to the Network only (no inbound port):
it registers with a grant from its owning account, fetches and verifies the signed NodeConfig,
installs the approved models after checking their sha256 and size, starts one Runtime child
process per model and leases jobs by long poll, signing a receipt for each.

Files, by default in the data directory:
  node.key     the node's Ed25519 key       (resultity keys generate DATA_DIR/node.key)
  grant.json   the account's NodeGrant      (resultity account grant ... --out DATA_DIR/grant.json)
  root.json    the trust root, trusted on first use unless --trust-root-digest pins it
  models/      model source: models/<name>/<version>/<files> as the NodeConfig lists them
"""


def register(subparsers: Any) -> None:
    """Add ``node serve`` to the CLI."""
    sub = add_command_group(subparsers, "node", help="run a node (Agent + Runtime)",
                            description=_DESCRIPTION)
    serve = sub.add_parser(
        "serve", help="run the node until Ctrl-C", description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--network", default=DEFAULT_NETWORK_URL, metavar="URL",
                       help=f"the Network's URL (default {DEFAULT_NETWORK_URL})")
    serve.add_argument("--data-dir", default=None, metavar="DIR",
                       help=f"the node's directory (default {data_home('node')})")
    serve.add_argument("--key", default=None, metavar="PATH", help="default DATA_DIR/node.key")
    serve.add_argument("--grant", default=None, metavar="PATH",
                       help="default DATA_DIR/grant.json")
    serve.add_argument("--trust-root", default=None, metavar="PATH",
                       help="default DATA_DIR/root.json (read on first start only)")
    serve.add_argument("--trust-root-digest", default=None, metavar="sha256:...",
                       help="pin the first trust root to this digest (from `trust init`)")
    serve.add_argument("--models-dir", default=None, metavar="DIR",
                       help="where approved model files are found (default DATA_DIR/models)")
    serve.add_argument("--max-jobs", type=int, default=None, metavar="N",
                       help="jobs run at once at most (default: what the network's config "
                       "allows; this can only lower it)")
    serve.add_argument("--device", default="cpu", help="torch device for the Runtime "
                       "(default cpu; e.g. cuda)")
    serve.add_argument("--threads", type=int, default=0, metavar="N",
                       help="CPU threads of each Runtime (default 0: torch decides)")
    serve.add_argument("--no-network-namespace", action="store_true",
                       help="do not put the Runtime in an empty network namespace")
    add_log_arg(serve)
    serve.set_defaults(handler=_serve)

    entry = sub.add_parser(
        "model-entry", help="list a model directory's files with sha256 and size",
        description="Print the NodeConfig model entry approving the model in DIR: every file "
        "(hidden ones skipped) with its sha256 and size, and the price. With --config, put "
        "the entry into that NodeConfig payload file instead (replacing an entry of the same "
        "name), ready for `resultity snapshot sign`.")
    entry.add_argument("dir", metavar="DIR", help="the model directory")
    entry.add_argument("--name", required=True, help="model name clients ask for")
    entry.add_argument("--version", default="1", help="model version (default 1)")
    entry.add_argument("--prompt-price", type=int, default=1_000, metavar="MICRO",
                       help="micro-credits per 1,000 prompt tokens (default 1000)")
    entry.add_argument("--completion-price", type=int, default=2_000, metavar="MICRO",
                       help="micro-credits per 1,000 completion tokens (default 2000)")
    entry.add_argument("--config", default=None, metavar="PAYLOAD",
                       help="NodeConfig payload (JSON) to update in place")
    entry.set_defaults(handler=_model_entry)


def _serve(args: argparse.Namespace) -> int:
    import anyio

    from resultity_core import ResultityError
    from resultity_servers._http import HTTPClient, HTTPClientError
    from resultity_servers.node import (
        RESTART_EXIT_CODE,
        AgentRestartRequired,
        NodeSettings,
        build_agent,
    )

    from ._cmd_network import run_server, termination_signals

    setup_logging(args.log_level)
    if args.max_jobs is not None and args.max_jobs < 1:
        raise CLIError("--max-jobs must be at least 1")
    if args.threads < 0:
        raise CLIError("--threads must not be negative")
    settings = NodeSettings(
        args.network, args.data_dir or data_home("node"), key_path=args.key,
        grant_path=args.grant, trust_root_path=args.trust_root,
        trust_root_digest=args.trust_root_digest, models_dir=args.models_dir,
        max_concurrent_jobs=args.max_jobs,
        device=args.device, runtime_threads=args.threads,
        network_namespace=not args.no_network_namespace,
    )
    try:
        agent = build_agent(settings)
    except OSError as exc:
        raise CLIError(f"node data directory {settings.data_dir}: "
                       f"{exc.strerror or exc}") from None

    async def main() -> str:
        try:
            async with HTTPClient(args.network, timeout_s=5.0) as probe:
                await probe.request("GET", "/network/v1/health")
        except HTTPClientError as exc:
            raise CLIError(f"cannot reach the network at {args.network}: {exc}") from None
        name = "stopped"
        failed: list[ResultityError] = []
        with termination_signals() as wait_for_signal:
            print(f"resultity node {agent.node_id[:12]} starting (network {args.network}, "
                  f"data {settings.data_dir})", flush=True)
            async with anyio.create_task_group() as tg:
                async def run_agent() -> None:
                    try:
                        await agent.run()
                    except ResultityError as exc:
                        failed.append(exc)
                    finally:
                        with anyio.CancelScope(shield=True):
                            await agent.transport.aclose()
                        tg.cancel_scope.cancel()

                tg.start_soon(run_agent)
                name = await wait_for_signal()
                tg.cancel_scope.cancel()
        if failed:
            if isinstance(failed[0], AgentRestartRequired):
                # a supervisor (container restart policy, systemd) restarts us on the new release
                raise CLIError(str(failed[0]), status=RESTART_EXIT_CODE)
            raise failed[0]
        return name

    name = run_server(main, "node", 0, "node")
    print(f"resultity node stopped ({name})", file=sys.stderr)
    return 0


def _model_entry(args: argparse.Namespace) -> int:
    import json

    from resultity_core import NodeConfig, Price
    from resultity_servers.node import model_entry_for_dir

    from ._common import load_json_strict, write_json_file

    path = Path(args.dir)
    if not path.is_dir():
        raise CLIError(f"model directory {path}: no such directory")
    if args.prompt_price < 0 or args.completion_price < 0:
        raise CLIError("prices must not be negative")
    entry = model_entry_for_dir(path, args.name, args.version,
                                Price(args.prompt_price, args.completion_price))
    if not entry.files:
        raise CLIError(f"model directory {path} has no files")
    payload = entry.to_payload()
    if args.config is None:
        print(json.dumps(payload, indent=2))
        return 0
    config = load_json_strict(args.config, "payload")
    if not isinstance(config, dict) or not isinstance(config.get("models"), list):
        raise CLIError(f"payload {args.config}: not a NodeConfig payload (no models list)")
    config["models"] = [m for m in config["models"]
                        if not (isinstance(m, dict) and m.get("name") == args.name)]
    config["models"].append(payload)
    NodeConfig.from_payload(config)
    write_json_file(args.config, config, mode=0o644)
    print(f"{args.config}: model {args.name} {args.version} with {len(entry.files)} files")
    return 0
