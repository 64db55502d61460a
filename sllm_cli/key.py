"""`sllm key create|list|revoke`: invocation keys for private functions (``/system/keys``,
admin token). A key is printed once, when it is created; the gateway keeps only its hash."""

from __future__ import annotations

import argparse
import json
import time

from sllm.spec import validate_name
from sllm_cli.app import Groups, group
from sllm_cli.output import add_gateway_flags, gateway_client, print_table


def cmd_create(args: argparse.Namespace) -> int:
    functions = [validate_name(f, "--function") for f in args.function or []]
    with gateway_client(args) as client:
        created = client.create_key(args.name or "", functions)
    if args.json:
        print(json.dumps(created))
        return 0
    scope = ", ".join(created.get("functions") or []) or "every function"
    print(f"key {created['id']} ({scope}); shown only now, keep it safe:\n{created['key']}")
    print(
        "\nuse it: sllm fn invoke NAME --key KEY, SLLM_KEY=KEY, 'key: KEY' in "
        "~/.config/sllm/config.yaml, or 'Authorization: Bearer KEY' (the openai client's api_key)"
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with gateway_client(args) as client:
        keys = client.keys()
    if args.json:
        print(json.dumps(keys))
        return 0
    rows = [
        [
            str(k.get("id")),
            str(k.get("name") or "-"),
            ", ".join(k.get("functions") or []) or "*",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(float(k.get("created") or 0))),
        ]
        for k in keys
    ]
    print_table(["ID", "NAME", "FUNCTIONS", "CREATED"], rows)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    with gateway_client(args) as client:
        client.revoke_key(args.id)
    print(f"revoked {args.id}")
    return 0


def register(root: argparse._SubParsersAction[argparse.ArgumentParser], groups: Groups) -> None:
    key = group(root, groups, "key", "invocation keys for private functions")

    p = key.add_parser("create", help="create a key (printed once)")
    p.add_argument("--name", help="what the key is for (shown in listings)")
    p.add_argument(
        "--function", "-f", action="append", help="a function it may call (repeat; default: all)"
    )
    p.add_argument("--json", action="store_true", help="print the gateway's JSON")
    add_gateway_flags(p)
    p.set_defaults(func=cmd_create)

    p = key.add_parser("list", help="list keys (never their secrets)")
    p.add_argument("--json", action="store_true", help="print the gateway's JSON")
    add_gateway_flags(p)
    p.set_defaults(func=cmd_list)

    p = key.add_parser("revoke", help="revoke a key by its id")
    p.add_argument("id")
    add_gateway_flags(p)
    p.set_defaults(func=cmd_revoke)
