"""``resultity account``: accounts, credits, API keys and node grants."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from ._cmd_network import add_network_client_args, admin_call
from ._common import CLIError, add_command_group, write_json_file

__all__ = ["register"]

MICRO = 1_000_000

_DESCRIPTION = """\
Accounts own credits, API keys and nodes. Amounts are integers in micro-credits
(1 credit = 1,000,000 micro-credits); prices in the NodeConfig are micro-credits per 1,000
tokens. `create`, `list`, `credit` and `key` talk to a running Network with the service token;
`grant` signs offline with the account's key.

typical flow:
  resultity keys generate alice.key
  resultity account create --id alice --public-key alice.key --credits 5000000
  resultity keys generate node/node.key
  resultity account grant --account alice --account-key alice.key \\
      --node-key node/node.key --out node/grant.json
"""


def register(subparsers: Any) -> None:
    """Add ``account create|list|credit|key|grant`` to the CLI."""
    sub = add_command_group(
        subparsers, "account", help="create accounts, add credits, issue API keys and node grants",
        description=_DESCRIPTION)

    create = sub.add_parser(
        "create", help="create an account and print its API key (shown once)",
        description="Create an account on the Network and print its id and its first API "
        "key. The key is shown only this once (the Network stores its hash): keep it.")
    create.add_argument("--id", dest="account_id", default=None, metavar="NAME",
                        help="account id, 1-128 of [A-Za-z0-9._:-] (default: random acct-...)")
    create.add_argument("--credits", type=int, default=0, metavar="MICRO",
                        help="initial balance in micro-credits (default 0)")
    create.add_argument("--public-key", default=None, metavar="KEYFILE",
                        help="key file of the account's Ed25519 key that signs node grants "
                        "(only its public key is sent)")
    create.add_argument("--json", action="store_true", help="print the answer as JSON")
    add_network_client_args(create)
    create.set_defaults(handler=_create)

    listing = sub.add_parser("list", help="list accounts with balances (micro-credits)",
                             description="Print every account's spendable balance and the "
                             "credits reserved by running jobs, in micro-credits.")
    listing.add_argument("--json", action="store_true", help="print the answer as JSON")
    add_network_client_args(listing)
    listing.set_defaults(handler=_list)

    credit = sub.add_parser(
        "credit", help="add micro-credits to an account",
        description="Add AMOUNT micro-credits (1 credit = 1,000,000) to ACCOUNT and print the "
        "new balance.")
    credit.add_argument("account", metavar="ACCOUNT", help="account id")
    credit.add_argument("amount", type=int, metavar="AMOUNT",
                        help="micro-credits to add (a positive integer)")
    add_network_client_args(credit)
    credit.set_defaults(handler=_credit)

    key = sub.add_parser("key", help="issue another API key for an account (shown once)",
                         description="Create a new API key for ACCOUNT and print it once.")
    key.add_argument("account", metavar="ACCOUNT", help="account id")
    add_network_client_args(key)
    key.set_defaults(handler=_key)

    grant = sub.add_parser(
        "grant", help="sign a NodeGrant binding a node key to an account",
        description="Sign, with the account's key, a NodeGrant stating that the node key "
        "belongs to ACCOUNT, and write it to --out (the node's grant.json). Offline: no "
        "Network needed, but the Network only admits it if the account was created with "
        "this --public-key.")
    grant.add_argument("--account", required=True, metavar="ACCOUNT", help="account id")
    grant.add_argument("--account-key", required=True, metavar="KEYFILE",
                       help="the account's key file (signs the grant)")
    grant.add_argument("--node-key", required=True, metavar="KEYFILE",
                       help="the node's key file (only its public key is used)")
    grant.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    grant.add_argument("--out", required=True, metavar="PATH", help="where to write the grant")
    grant.set_defaults(handler=_grant)


def _credits(micro: int) -> str:
    return f"{micro:,} micro-credits ({micro / MICRO:g} credits)"


def _create(args: argparse.Namespace) -> int:
    import attrs

    from resultity_core import load_key_file

    if args.credits < 0:
        raise CLIError("--credits must not be negative")
    public = load_key_file(args.public_key).public_key if args.public_key else None
    created = admin_call(args, lambda client: client.create_account(
        args.account_id or None, public_key=public, credits=args.credits))
    if args.json:
        # the Network's answer: the account's balance (nothing reserved yet) and its key
        print(json.dumps({**attrs.asdict(created), "reserved": 0}, indent=2, sort_keys=True))
        return 0
    print(f"account: {created.account_id}")
    print(f"balance: {_credits(created.balance)}")
    print(f"API key: {created.api_key}")
    print("(the API key is shown only this once; store it now)")
    return 0


def _list(args: argparse.Namespace) -> int:
    import attrs

    rows = admin_call(args, lambda client: client.list_accounts())
    if args.json:
        print(json.dumps([attrs.asdict(r) for r in rows], indent=2, sort_keys=True))
        return 0
    print(f"{'ACCOUNT':<32} {'BALANCE (micro)':>18} {'RESERVED (micro)':>18}")
    for row in rows:
        print(f"{row.account_id:<32} {row.balance:>18,} {row.reserved:>18,}")
    return 0


def _credit(args: argparse.Namespace) -> int:
    if args.amount <= 0:
        raise CLIError("AMOUNT must be a positive number of micro-credits")
    balance = admin_call(args, lambda client: client.credit(args.account, args.amount))
    print(f"{balance.account_id}: balance {_credits(balance.balance)}")
    return 0


def _key(args: argparse.Namespace) -> int:
    key = admin_call(args, lambda client: client.create_api_key(args.account))
    print(f"API key: {key}")
    print("(the API key is shown only this once; store it now)")
    return 0


def _grant(args: argparse.Namespace) -> int:
    from resultity_core import NodeGrant, load_key_file, sign_grant

    if args.days < 1:
        raise CLIError("--days must be at least 1")
    account_key = load_key_file(args.account_key)
    node_key = load_key_file(args.node_key)
    now = int(time.time())
    try:
        grant = NodeGrant(args.account, node_key.public_key, now - 60, now + args.days * 86_400)
        envelope = sign_grant(grant, account_key)
        NodeGrant.from_payload(envelope.signed)
    except ValueError as exc:
        raise CLIError(f"cannot make the grant: {exc}") from None
    write_json_file(args.out, envelope.to_payload(), mode=0o644)
    print(f"wrote the grant of node {node_key.keyid[:16]}... to account {args.account} "
          f"to {args.out}")
    return 0
