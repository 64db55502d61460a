"""`sllm nats creds DIR --node ID ...`: NATS credentials for a platform run outside `sllm up`
(compose, Kubernetes): an NKey seed per identity (``gateway.nk``, ``node-<id>.nk``) and the
server's ``auth.conf`` (public keys and each role's permissions, ``nats-server -c``). Existing
seeds are kept, so running it again with another ``--node`` adds that node."""

from __future__ import annotations

import argparse
from pathlib import Path

from sllm.cli.app import Groups, group
from sllm.nats_auth import NatsCredentials


def cmd_creds(args: argparse.Namespace) -> int:
    creds = NatsCredentials(Path(args.dir))
    made = [creds.gateway(), *(creds.node(node_id) for node_id in args.node or [])]
    config = creds.write_config()
    for path in made:
        print(f"seed    {path}")
    print(f"server  {config} (public keys only)")
    print(
        "\ngive each component its own seed (SLLM_NATS_SEED_FILE, from a secret) and the server "
        "its config (nats-server -c); after adding a node, reload the server (SIGHUP)"
    )
    return 0


def register(root: argparse._SubParsersAction[argparse.ArgumentParser], groups: Groups) -> None:
    nats = group(root, groups, "nats", "NATS credentials")
    p = nats.add_parser("creds", help="make NKey seeds and the server's authorization config")
    p.add_argument("dir", help="directory for the seeds and auth.conf (made mode 0700)")
    p.add_argument("--node", action="append", help="a node id to make a seed for (repeat)")
    p.set_defaults(func=cmd_creds)
