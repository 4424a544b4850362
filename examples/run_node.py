"""Run a node against a remote Resultity network, from Python.

    python examples/run_node.py --network https://network.example.org --data-dir ./node

The data directory holds what the network's operator and your account gave you (the same
layout `resultity node serve` uses):

    node.key     your node's key:   resultity keys generate ./node/node.key
    grant.json   your account's grant for it:
                 resultity account grant --account ACCOUNT --account-key account.key \
                     --node-key ./node/node.key --out ./node/grant.json
    root.json    the network's trust root (pin it with --trust-root-digest)
    models/      model files, as models/<name>/<version>/<files>; the node installs only what
                 the signed NodeConfig approves, after checking sha256 and size

The Agent dials out only (no inbound port), so this works behind NAT. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import logging
import sys

import anyio

from resultity_servers.node import NodeSettings, serve_node


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", required=True, help="the Network's URL")
    parser.add_argument("--data-dir", default="./node", help="the node's directory")
    parser.add_argument("--trust-root-digest", default=None, help="pin the trust root")
    parser.add_argument("--max-jobs", type=int, default=None,
                        help="cap below what the network's config allows")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = NodeSettings(
        args.network, args.data_dir, trust_root_digest=args.trust_root_digest,
        max_concurrent_jobs=args.max_jobs, device=args.device,
    )
    try:
        anyio.run(serve_node, settings)
    except KeyboardInterrupt:
        print("node stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
