"""Many hosts on one machine: each host a Linux network namespace, joined to the others by a
veth pair into one bridge, each link shaped by ``tc`` (iproute2), so the store, the NATS
servers, the nodes and the gateways talk over real interfaces at a chosen rate and delay.

```
 root namespace: bridge sl<tag>br 198.18.<k>.1/24 (the tests and their clients live here)
   ├── veth sl<tag>v0 ══ eth0 198.18.<k>.10  namespace sllm-<tag>-store
   ├── veth sl<tag>v1 ══ eth0 198.18.<k>.11  namespace sllm-<tag>-node-a
   └── ...
```

- Addresses come from 198.18.0.0/15, the range RFC 2544 sets aside for benchmarking network
  devices: it is never routed anywhere, and a /24 not on any interface of the machine is
  chosen (under a lock), so topologies made at the same time do not collide.
- A link is shaped on both ends (egress of each side): ``tbf`` at ``rate`` (a host's NIC),
  under ``netem`` for one-way ``delay`` (netem needs the kernel's sch_netem, which this
  machine's kernel lacks: a delay there is refused with that reason). Measured here: a link
  shaped to 100mbit carries 12.0 MB/s of TCP payload, to the host and from it.
- A program runs on a host with ``Host.wrap`` (``ip netns exec <ns>``, which execs: the pid
  is the program's own, so SIGKILL and SIGSTOP by pid reach it).
- ``remove`` kills what still runs in the namespaces, then deletes them (their veth ends go
  with them) and the bridge. Needs root (CAP_NET_ADMIN).

``python -m sllm_cli.netns up|down|list`` does the same for people (see docs/deploy-kubernetes.md,
"Many hosts on one machine").
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from sllm.errors import Unavailable, ValidationFailed
from sllm.spec import validate_name

PREFIX = "sllm-"
BENCH_RANGE = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544
LOCK_PATH = Path("/run/lock/sllm-netns.lock")
# <tag> files naming the pid that made each topology (a test session finds its own leftovers)
OWNERS = Path("/run/sllm-netns")
# tc rates as tc writes them: 100mbit, 1gbit, 12500kbps, ...
_RATE = re.compile(r"^\d+(\.\d+)?(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps|tbps)$")
_RATE_BITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_RATE_BITS.update({"bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12})


def rate_bytes_per_s(rate: str) -> float:
    """``"100mbit"`` -> 12.5e6. tc's units: ``bit`` suffixes are bits, ``bps`` ones bytes."""
    match = _RATE.match(rate)
    if match is None:
        raise ValidationFailed(f"rate {rate!r}: want a tc rate such as 100mbit or 1gbit")
    unit = match.group(2)
    return float(rate[: -len(unit)]) * _RATE_BITS[unit] / 8


@dataclass(frozen=True)
class LinkShape:
    """One host's link: ``rate`` each way (None: unshaped) and one-way ``delay_ms``."""

    rate: str | None = None
    delay_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.rate is not None:
            rate_bytes_per_s(self.rate)
        if not 0.0 <= self.delay_ms <= 10_000.0:
            raise ValidationFailed(f"delay {self.delay_ms} ms: want 0 to 10000")


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    address: str
    veth: str
    shape: LinkShape

    @property
    def wrap(self) -> tuple[str, ...]:
        """Prefix of a command that runs it on this host."""
        return ("ip", "netns", "exec", self.netns)


@dataclass
class Topology:
    tag: str
    bridge: str
    address: str  # the root namespace's address on the bridge
    hosts: dict[str, Host] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def remove(self) -> None:
        remove(self.tag)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise Unavailable(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def _tc(netns: str | None, *args: str) -> None:
    cmd = ["tc", *args] if netns is None else ["ip", "netns", "exec", netns, "tc", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        why = proc.stderr.strip() or str(proc.returncode)
        if "netem" in args and "unknown" in why:
            why = "this kernel has no netem (sch_netem), so links cannot be delayed: use delay 0"
        raise Unavailable(f"{' '.join(cmd)}: {why}")


def shape_commands(device: str, shape: LinkShape) -> list[list[str]]:
    """The ``tc`` argument lists that shape ``device``'s egress: netem (delay) as root with
    tbf (rate) under it, or either alone."""
    commands: list[list[str]] = []
    parent = ["root"]
    if shape.delay_ms > 0:
        commands.append(
            [
                "qdisc",
                "add",
                "dev",
                device,
                "root",
                "handle",
                "1:",
                "netem",
                "delay",
                f"{shape.delay_ms}ms",
                "limit",
                "100000",
            ]
        )
        parent = ["parent", "1:1"]
    if shape.rate is not None:
        # burst: 10 ms at the rate, at least 64 KiB (a GSO segment of 64 KiB must fit, or tbf
        # drops it); latency 100 ms of queue before drops.
        burst = max(int(rate_bytes_per_s(shape.rate) / 100), 64 * 1024)
        commands.append(
            [
                "qdisc",
                "add",
                "dev",
                device,
                *parent,
                "handle",
                "10:",
                "tbf",
                "rate",
                shape.rate,
                "burst",
                str(burst),
                "latency",
                "100ms",
            ]
        )
    return commands


@contextmanager
def _lock() -> Iterator[None]:
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_PATH, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = _ip("-4", "-o", "addr", "show").stdout
    found = re.findall(r"inet (\d+\.\d+\.\d+\.\d+/\d+)", out)
    return [ipaddress.IPv4Interface(a).network for a in found]


def _free_subnet() -> ipaddress.IPv4Network:
    used = _used_networks()
    for subnet in BENCH_RANGE.subnets(new_prefix=24):
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise Unavailable("no free /24 left in 198.18.0.0/15 for a topology")


def create(names: Sequence[str], shape: LinkShape | dict[str, LinkShape]) -> Topology:
    """A bridge and one namespace per name (DNS-1123 labels, at most 200), each linked to the
    bridge and shaped (one shape for all, or one per name; a name left out is unshaped)."""
    if not names or len(names) > 200 or len(set(names)) != len(names):
        raise ValidationFailed(f"hosts {list(names)}: want 1 to 200 distinct names")
    for name in names:
        validate_name(name, "host name")
    shapes = shape if isinstance(shape, dict) else {n: shape for n in names}
    tag = secrets.token_hex(3)
    bridge = f"sl{tag}br"
    with _lock():
        subnet = _free_subnet()
        hosts_ip = list(subnet.hosts())
        topo = Topology(tag, bridge, str(hosts_ip[0]))
        OWNERS.mkdir(parents=True, exist_ok=True)
        (OWNERS / tag).write_text(str(os.getpid()), encoding="utf-8")
        try:
            _ip("link", "add", bridge, "type", "bridge")
            _ip("addr", "add", f"{topo.address}/24", "dev", bridge)
            _ip("link", "set", bridge, "up")
            for i, name in enumerate(names):
                host = Host(
                    name,
                    f"{PREFIX}{tag}-{name}",
                    str(hosts_ip[9 + i]),
                    f"sl{tag}v{i}",
                    shapes.get(name, LinkShape()),
                )
                _add_host(topo, host)
        except BaseException:
            remove(tag)
            raise
    return topo


def _add_host(topo: Topology, host: Host) -> None:
    _ip("netns", "add", host.netns)
    topo.hosts[host.name] = host
    _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
    _ip("link", "set", host.veth, "master", topo.bridge, "up")
    _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
    _ip("-n", host.netns, "link", "set", "eth0", "up")
    _ip("-n", host.netns, "link", "set", "lo", "up")
    for args in shape_commands(host.veth, host.shape):
        _tc(None, *args)  # towards the host
    for args in shape_commands("eth0", host.shape):
        _tc(host.netns, *args)  # from the host


def namespaces(tag: str | None = None) -> list[str]:
    """Namespaces of this module's topologies (of one ``tag``, or all)."""
    out = _ip("netns", "list").stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    want = f"{PREFIX}{tag}-" if tag else PREFIX
    return sorted(n for n in names if n.startswith(want))


def _pids_in(netns: str) -> list[int]:
    out = _ip("netns", "pids", netns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def remove(tag: str, grace_s: float = 5.0) -> None:
    """Stop what still runs on the topology's hosts (SIGTERM, then SIGKILL after
    ``grace_s``), delete its namespaces and its bridge. Safe to call twice."""
    spaces = namespaces(tag)
    pids = [p for ns in spaces for p in _pids_in(ns)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
            time.sleep(0.05)
    for ns in spaces:
        _ip("netns", "del", ns, check=False)
    _ip("link", "del", f"sl{tag}br", check=False)
    (OWNERS / tag).unlink(missing_ok=True)


def tags_of(pid: int) -> list[str]:
    """Tags of the topologies that process ``pid`` made and that still exist."""
    if not OWNERS.is_dir():
        return []
    return sorted(
        f.name for f in OWNERS.iterdir() if f.read_text(encoding="utf-8").strip() == str(pid)
    )


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def _cmd_up(args: argparse.Namespace) -> int:
    shape = LinkShape(args.rate, args.delay_ms)
    topo = create(args.hosts.split(","), shape)
    print(f"topology {topo.tag}: bridge {topo.bridge} {topo.address}/24 (this namespace)")
    for host in topo.hosts.values():
        print(f"  {host.name:<12} {host.address:<15} ip netns exec {host.netns} <command>")
    print(f"remove it with: python -m sllm_cli.netns down {topo.tag}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    for tag in args.tags or sorted({n[len(PREFIX) :].split("-")[0] for n in namespaces()}):
        remove(tag)
        print(f"removed {tag}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    for ns in namespaces():
        out = _ip("-n", ns, "-4", "-br", "addr", "show", "dev", "eth0", check=False).stdout
        print(f"{ns:<32} {' '.join(out.split()[2:])}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sllm_cli.netns", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    sub = parser.add_subparsers(required=True)
    up = sub.add_parser("up", help="create hosts joined by shaped links")
    up.add_argument("--hosts", default="store,nats-0,nats-1,nats-2,gw-0,gw-1,node-0,node-1")
    up.add_argument("--rate", default="1gbit", help="each link's rate, a tc rate (1gbit)")
    up.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per link")
    up.set_defaults(func=_cmd_up)
    down = sub.add_parser("down", help="remove topologies (all of them without a tag)")
    down.add_argument("tags", nargs="*")
    down.set_defaults(func=_cmd_down)
    ls = sub.add_parser("list", help="list the hosts of every topology")
    ls.set_defaults(func=_cmd_list)
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except (Unavailable, ValidationFailed) as exc:
        print(f"sllm_cli.netns: error: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
