"""`sllm up`'s supervisor (issue 14): a child that dies on its own (crashed, killed) is
started again with the same environment and ports after a backoff; one that keeps dying right
after its start ends `sllm up`. The children are the gateway, the node and nats-server, or with
``--ha`` each member of the NATS cluster (started again with its name, ports and store, as a
restarted pod would be): one mechanism for all of them."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sllm_cli.servers import ManagedServer

# Restarts: the first after 0.5 s (a crashed node should be back at once), doubling up to
# 30 s while the child keeps dying within STABLE_S of its start; a child that stayed up that
# long starts again from 0.5 s. CRASH_LOOP quick deaths in a row give up.
FIRST_RESTART_S = 0.5
MAX_RESTART_S = 30.0
STABLE_S = 60.0
CRASH_LOOP = 6


def restart_delay(quick_deaths: int) -> float | None:
    """Seconds before restarting a child that died for the ``quick_deaths``-th time in a row
    within ``STABLE_S`` of its start (1: the first), or None: it is crash-looping, give up."""
    if quick_deaths >= CRASH_LOOP:
        return None
    return float(min(MAX_RESTART_S, FIRST_RESTART_S * 2 ** max(0, quick_deaths - 1)))


@dataclass
class _Watch:
    """A supervised child: when it started, its quick deaths in a row, when to restart it."""

    started: float
    quick_deaths: int = 0
    restart_at: float | None = None


def supervise(
    servers: list[ManagedServer],
    starters: Mapping[str, Callable[[], ManagedServer]],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Restart children that die on their own, with backoff (``restart_delay``), until a
    signal (raised out of the sleep) or a crash loop (-> 1). ``servers`` is updated in place
    with each restarted child; ``starters`` starts a child again by its name."""
    watches = {server.name: _Watch(clock()) for server in servers}
    while True:
        now = clock()
        for i, server in enumerate(servers):
            watch = watches[server.name]
            if watch.restart_at is not None:
                if now >= watch.restart_at:
                    watch.restart_at, watch.started = None, now
                    try:
                        servers[i] = starters[server.name]()
                    except Exception as exc:  # could not even start: counts as a quick death
                        _log(f"{server.name} did not start again: {exc}")
                        code = _died(watch, server, now, "did not start")
                        if code is not None:
                            return code
                        continue
                    _log(f"{server.name} restarted (pid {servers[i].process.pid})")
                continue
            if not server.alive():
                code = _died(watch, server, now, f"exited (code {server.process.returncode})")
                if code is not None:
                    return code
        sleep(0.2)


def _died(watch: _Watch, server: ManagedServer, now: float, how: str) -> int | None:
    """Schedule the restart of a dead child (None), or give up on a crash loop (1)."""
    up_s = now - watch.started
    watch.quick_deaths = watch.quick_deaths + 1 if up_s < STABLE_S else 1
    delay = restart_delay(watch.quick_deaths)
    if delay is None:
        print(
            f"sllm: error: {server.name} {how} and keeps crashing ({watch.quick_deaths} times "
            f"in a row within {STABLE_S:.0f}s of starting); log {server.log_path}:\n"
            f"{server.log_tail()}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    _log(
        f"{server.name} {how} after {up_s:.1f}s; restarting it in {delay:g}s (log {server.log_path})"
    )
    watch.restart_at = now + delay
    return None


def _log(line: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"{stamp} sllm up: {line}", file=sys.stderr, flush=True)
