"""`sllm nats creds DIR --node ID ... [--routes URL,...]`: NATS credentials for a platform run
outside `sllm up` (compose, Kubernetes): an NKey seed per identity (``gateway.nk``,
``node-<id>.nk``) and the server's ``auth.conf`` (public keys and each role's permissions,
``nats-server -c``). With ``--routes``, also the route password (``route.secret``) and
``cluster.conf`` for the members of a cluster (it includes ``auth.conf``). Existing seeds and
the password are kept, so running it again with another ``--node`` adds that node."""

from __future__ import annotations

import argparse
from pathlib import Path

from sllm.errors import ValidationFailed
from sllm.nats_auth import NatsCredentials
from sllm.settings import as_nats_urls
from sllm_cli.app import Groups, group


def cmd_creds(args: argparse.Namespace) -> int:
    try:
        routes = as_nats_urls(args.routes) if args.routes else ()
    except ValueError as exc:
        raise ValidationFailed(f"--routes {args.routes!r}: {exc}") from None
    creds = NatsCredentials(Path(args.dir))
    made = [creds.gateway(), *(creds.node(node_id) for node_id in args.node or [])]
    config = creds.write_config()
    for path in made:
        print(f"seed    {path}")
    print(f"server  {config} (public keys only)")
    if routes:
        cluster = creds.write_cluster_config(routes, args.cluster_listen)
        print(f"cluster {cluster} (includes auth.conf; holds the route password: secret)")
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
    p.add_argument(
        "--routes",
        help="every cluster member's route URL, comma-separated (nats://nats-0:6222,...): "
        "also write cluster.conf, with a route password",
    )
    p.add_argument(
        "--cluster-listen",
        default="0.0.0.0:6222",
        help="where members listen for routes (with --routes; default 0.0.0.0:6222)",
    )
    p.set_defaults(func=cmd_creds)
