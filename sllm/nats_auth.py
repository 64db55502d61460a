"""NATS credentials: one NKey per identity, and the nats-server authorization that limits each
identity to the subjects its role needs.

Why NKeys rather than user/password: the server authenticates a client by a challenge it signs
with its Ed25519 seed, so the seed never crosses the network (our NATS has no TLS yet, and a
password would travel in clear in the CONNECT line), and the server's configuration holds only
public keys: it can be shown, copied and put in a config map without giving anything away.

Identities (files in one directory, mode 0600, a directory of mode 0700):
- ``gateway.nk``: the gateway role, shared by every gateway (they are interchangeable).
- ``node-<id>.nk``: one per node; its permissions name its id, so a node can publish only its
  own heartbeats, events and logs and receive only its own commands.
- ``route.secret``: the password the servers of a cluster give each other on their routes.
  nats-server authenticates routes by user and password (or TLS certificates), not NKeys;
  without it anything that reaches a cluster port could join the cluster and see every message.

A client with no credentials, or unknown ones, is refused by the server.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import nkeys

from sllm.spec import validate_name

GATEWAY_FILE = "gateway.nk"
CONFIG_FILE = "auth.conf"
ROUTE_FILE = "route.secret"
CLUSTER_FILE = "cluster.conf"

# The gateway: commands to any node, JetStream (the registry, keys and lease buckets), every
# node's heartbeats, events and logs, what gateways tell each other (sllm.gateway.>: load
# reports and manual scales for the leader, gateway.peers); request replies come back on its
# inbox.
GATEWAY_PERMISSIONS: dict[str, object] = {
    "publish": {
        "allow": [
            "sllm.node.*.cmd",
            "sllm.gateway.>",
            "$JS.API.>",
            "$JS.ACK.>",
            "$JS.FC.>",
            "$KV.>",
        ]
    },
    "subscribe": {
        "allow": [
            "sllm.gateway.>",
            "sllm.node.*.heartbeat",
            "sllm.node.*.event",
            "sllm.node.*.logs.>",
            "sllm.migration.>",
            "_INBOX.>",
        ]
    },
}


def node_permissions(node_id: str) -> dict[str, object]:
    """A node publishes under its own subjects only, receives only its own commands, and may
    answer the requests it received (allow_responses), nothing else."""
    own = f"sllm.node.{node_id}"
    return {
        "publish": {
            "allow": [f"{own}.heartbeat", f"{own}.event", f"{own}.logs.>", "sllm.migration.>"]
        },
        "subscribe": {"allow": [f"{own}.cmd"]},
        "allow_responses": True,
    }


# the user name routes authenticate as (the password is the cluster's secret)
ROUTE_USER = "sllm-route"


def cluster_block(
    name: str, listen: str, routes: Sequence[str], credentials: NatsCredentials | None
) -> str:
    """nats-server's ``cluster`` block: listen for routes on ``listen`` and solicit ``routes``
    (every member's route URL, its own included: nats-server skips itself). With
    ``credentials``, routes must give the cluster's route password, and these give it."""
    auth = ""
    if credentials is not None:
        password = credentials.route_password()
        auth = (
            f"authorization {{ user: {json.dumps(ROUTE_USER)}, "
            f"password: {json.dumps(password)} }}, "
        )
        routes = [_with_user(r, ROUTE_USER, password) for r in routes]
    quoted = ", ".join(json.dumps(r) for r in routes)
    return (
        f"cluster {{ name: {json.dumps(name)}, listen: {json.dumps(listen)}, "
        f"{auth}routes: [{quoted}] }}"
    )


def _with_user(url: str, user: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{rest}"


def new_seed() -> str:
    """A new user NKey seed ("SU..."), from 32 bytes of the OS's randomness."""
    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed.decode()


def public_key(seed: str) -> str:
    """The public key ("U...") of a seed."""
    key: bytes = nkeys.from_seed(bytearray(seed.strip().encode())).public_key
    return key.decode()


def node_file(node_id: str) -> str:
    """The seed file name of node ``node_id``."""
    return f"node-{validate_name(node_id, 'node id')}.nk"


@dataclass(frozen=True)
class NatsCredentials:
    """The seeds in ``directory`` and the server authorization rendered from them
    (``auth.conf`` beside them, for ``nats-server -c``)."""

    directory: Path

    @property
    def config_path(self) -> Path:
        """Where the server's authorization file is written."""
        return self.directory / CONFIG_FILE

    def gateway(self) -> Path:
        """The gateway role's seed file, made on first use."""
        return self._ensure(GATEWAY_FILE)

    def node(self, node_id: str) -> Path:
        """Node ``node_id``'s seed file, made on first use."""
        return self._ensure(node_file(node_id))

    def route_password(self) -> str:
        """The cluster's route password (256 random bits), made on first use."""
        path = self.directory / ROUTE_FILE
        if not path.is_file():
            self._make_directory()
            _write_private(path, secrets.token_urlsafe(32) + "\n")
        return path.read_text(encoding="utf-8").strip()

    def _ensure(self, name: str) -> Path:
        path = self.directory / name
        if not path.is_file():
            self._make_directory()
            _write_private(path, new_seed() + "\n")
            self.write_config()
        return path

    def server_config(self) -> str:
        """nats-server's ``authorization`` block: each identity's public key and permissions."""
        users = []
        for path in sorted(self.directory.glob("*.nk")):
            if path.name == GATEWAY_FILE:
                permissions = GATEWAY_PERMISSIONS
            elif path.name.startswith("node-"):
                permissions = node_permissions(path.name[len("node-") : -len(".nk")])
            else:
                continue
            key = public_key(path.read_text(encoding="utf-8"))
            users.append(
                f"    {{ nkey: {json.dumps(key)}, permissions: {json.dumps(permissions)} }}"
            )
        return (
            "# made by sllm (sllm/nats_auth.py); public keys only\nauthorization {\n  users = [\n"
            + "\n".join(users)
            + "\n  ]\n}\n"
        )

    def _make_directory(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)

    def write_cluster_config(
        self, routes: Sequence[str], listen: str = "0.0.0.0:6222", name: str = "sllm"
    ) -> Path:
        """``cluster.conf`` beside ``auth.conf``, for every member of a cluster run from one
        config (compose, ``nats-server -c cluster.conf --name nats-<i>``): it includes the
        authorization and holds the cluster block with the route password, so it is as secret
        as a seed."""
        self.write_config()
        text = (
            "# made by sllm (sllm/nats_auth.py): holds the route password, keep it secret\n"
            f"include {json.dumps(CONFIG_FILE)}\n"
            + cluster_block(name, listen, routes, self)
            + "\n"
        )
        path = self.directory / CLUSTER_FILE
        _write_private(path, text)
        return path

    def write_config(self) -> Path:
        """Write the server's authorization file for the seeds made so far; its path."""
        self._make_directory()
        _write_private(self.config_path, self.server_config())
        return self.config_path


def _write_private(path: Path, text: str) -> None:
    """Atomically, readable by the owner only."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
