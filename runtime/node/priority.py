"""Idle pool processes run at background CPU priority; a load brings its process back.

The node refills its pool right after a load is ready, so a new process imports torch and
transformers (or vLLM), warms up, premaps the DRAM images, loads their tokenizers and may
build a warm vLLM engine, all while the instance just loaded answers its first requests. On
this 2-core VM a refilling process at the same priority made an instance's 16 tokens take
2.2-2.5 s instead of 0.67-0.78 s; at nice 10, 0.82-0.99 s, at nice 19, 0.78-0.82 s (measured,
SmolLM2 on the transformers backend, two rounds each).

So a pool process starts at ``IDLE_NICE`` and ``SCHED_IDLE`` (the worker applies
``SLLM_WORKER_NICE`` and the policy before its imports; every thread it starts inherits both),
and the node sets every thread of the process it takes for a load back to the node's own
priority and policy. ``SCHED_IDLE`` because a serving thread woken beside a nice-10 process
waits for the end of that process's slice, and beside a ``SCHED_IDLE`` one preempts it at once:
8 tokens in a loop beside a starting pool process took 0.361-0.367 s (median) against
0.356-0.371 s alone and 0.400-0.420 s beside one at nice 10 only. Lowering a nice value needs
CAP_SYS_NICE: a node without it starts pool processes at its own priority, as before, rather
than leave instances at a lower one.

``SCHED_IDLE`` and nice order threads within one scheduling group only. Linux's autogroups
(``kernel.sched_autogroup_enabled``, on by default) give each session its own group, and the
groups share the CPUs as equals: a pool process in a session of its own took a full core of
two, and a transformers instance's two torch threads shared the other (the requests after a
cold start came 1.7-1.9 s apart instead of 0.6 s; 2026-12-05). So the node starts instance
processes in its own session, each in a process group of its own (``worker_process``); a
container's cgroup is such a group too (``runtime.container.backend``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, MutableMapping
from pathlib import Path

log = logging.getLogger(__name__)

IDLE_NICE = 10
ENV = "SLLM_WORKER_NICE"  # read by runtime.instance.worker before its imports
CAP_SYS_NICE = 23


def _has_cap_sys_nice(status: str) -> bool:
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_NICE & 1)
    return False


@functools.cache
def idle_nice() -> int:
    """The nice value pool processes start at: ``IDLE_NICE`` where this process may bring
    them back (CAP_SYS_NICE), else 0."""
    try:
        status = Path("/proc/self/status").read_text(encoding="utf-8")
    except OSError:
        return 0
    return IDLE_NICE if _has_cap_sys_nice(status) else 0


# libgomp's spins before a thread waiting at a barrier sleeps. Its default (300000) made a
# transformers instance's two torch threads stall beside a busy ``SCHED_IDLE`` pool process:
# 8 tokens took 4.6 s instead of 0.35 s while a refill ran (SmolLM2, 2 cores), 1.5 s at 10000
# with the same speed alone (0.357 against 0.354-0.379 s), 0.7-0.9 s at 1000 but 13 % slower
# alone. vLLM sets up its own threads: not applied there.
OMP_SPIN_ENV, OMP_SPIN = "GOMP_SPINCOUNT", "10000"


def omp_spin(environ: MutableMapping[str, str], backend: str) -> None:
    """Set libgomp's spin count for a transformers instance process, before torch loads it,
    unless the operator set one."""
    if backend != "vllm":
        environ.setdefault(OMP_SPIN_ENV, OMP_SPIN)


def idle_policy() -> None:
    """Make the calling thread (and every thread it starts from now on) ``SCHED_IDLE``, which
    needs no privilege; the worker calls it with its nice value before its imports."""
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def set_nice(pid: int, nice: int, *, idle: bool) -> None:
    """Give every thread of process ``pid`` the nice value ``nice`` and the policy
    ``SCHED_IDLE`` (``idle``) or this process's own (Linux keeps both per thread: setting them
    on the pid alone would leave torch's threads behind). OSError (EPERM, EACCES) when not
    allowed; a process or thread that ended meanwhile is skipped."""
    policy = os.SCHED_IDLE if idle else os.sched_getscheduler(0)
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):
            os.sched_setscheduler(int(tid), policy, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)


def _per_thread(pid: int, read: Callable[[int], int]) -> list[int]:
    values = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            values.append(read(int(tid)))
    return values


def policy_of(pid: int) -> list[int]:
    """The scheduling policy of each thread of ``pid`` (for tests and diagnostics)."""
    return _per_thread(pid, os.sched_getscheduler)


def nice_of(pid: int) -> list[int]:
    """The nice value of each thread of ``pid`` (for tests and diagnostics)."""
    return _per_thread(pid, lambda tid: os.getpriority(os.PRIO_PROCESS, tid))
