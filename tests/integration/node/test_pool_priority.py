"""Idle pool processes wait at background CPU priority (nice 10 and ``SCHED_IDLE``) and a
load brings its process back (runtime.node.priority): a real instance process, every one of
its threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime.node.priority import IDLE_NICE, _has_cap_sys_nice, idle_nice, nice_of, policy_of
from runtime.node.worker_pool import WorkerPool
from runtime.node.worker_process import ProcessLauncher


def same_autogroup(a: int, b: int) -> bool:
    """Both processes in one autogroup. The file is empty for a process in the kernel's
    default group (as on CI, where no session made one) and absent where the kernel has no
    autogroups: the same text, or none, is the same group."""
    try:
        return Path(f"/proc/{a}/autogroup").read_text() == Path(f"/proc/{b}/autogroup").read_text()
    except FileNotFoundError:
        return True


def test_cap_sys_nice_is_read_from_the_effective_set() -> None:
    assert _has_cap_sys_nice("Name:\tx\nCapEff:\t000001ffffffffff\n")
    assert not _has_cap_sys_nice("CapEff:\t0000000000000000\n")
    assert not _has_cap_sys_nice("CapEff:\t0000000000400000\n")  # CAP_SYS_BOOT only
    assert _has_cap_sys_nice("CapEff:\t0000000000800000\n")
    assert not _has_cap_sys_nice("")


async def test_a_pool_process_idles_niced_and_serves_at_the_nodes_priority() -> None:
    own = os.getpriority(os.PRIO_PROCESS, 0)
    policy = os.sched_getscheduler(0)
    pool = WorkerPool(1, ProcessLauncher({"SLLM_INSTANCE_THREADS": "2"}))
    try:
        pool.replenish()
        worker, pre_started = await pool.take()  # waits for the refill: pre-started
        pool._idle.append(worker)  # back into the pool, which stops it at the end
        assert pre_started
        # taken: every thread (torch's started during the warm-up too) at the node's priority
        assert worker.nice == 0 and set(nice_of(worker.pid)) == {own}
        assert set(policy_of(worker.pid)) == {policy}
        idle = await pool.launcher.spawn(background=True)
        try:
            await idle.wait_idle()
            # the node's session, so its scheduling group (autogroup): SCHED_IDLE ranks it
            # below the node's instances, not beside them as a group of its own; its own
            # process group, so a Ctrl-C to the node's terminal does not reach it
            assert os.getsid(idle.pid) == os.getsid(0) and os.getpgid(idle.pid) == idle.pid
            assert same_autogroup(idle.pid, os.getpid())
            threads = nice_of(idle.pid)
            assert len(threads) > 1  # torch's threads exist and inherited the value
            if idle_nice() == 0:  # no CAP_SYS_NICE: nothing could bring it back, so not niced
                assert set(threads) == {own}
                pytest.skip("this process lacks CAP_SYS_NICE: pool processes are not niced")
            assert set(threads) == {own + IDLE_NICE}
            # a waking serving thread preempts it at once (at nice 10 it ran out its slice)
            assert set(policy_of(idle.pid)) == {os.SCHED_IDLE}
            idle.foreground()
            assert idle.nice == 0 and set(nice_of(idle.pid)) == {own}
            assert set(policy_of(idle.pid)) == {policy}
            idle.background()  # returned to its pool idle (after the vLLM probe)
            assert idle.nice == IDLE_NICE and set(nice_of(idle.pid)) == {own + IDLE_NICE}
            assert set(policy_of(idle.pid)) == {os.SCHED_IDLE}
        finally:
            idle.kill()
            await idle.wait()
    finally:
        await pool.close()


def test_a_transformers_instance_spins_briefly_at_omp_barriers() -> None:
    """libgomp's spin count for a transformers instance (set before torch loads libgomp):
    10000 unless the operator chose one; vLLM's processes keep their own thread setup."""
    from runtime.node.priority import OMP_SPIN, OMP_SPIN_ENV, omp_spin

    environ: dict[str, str] = {}
    omp_spin(environ, "transformers")
    assert environ == {OMP_SPIN_ENV: OMP_SPIN} and OMP_SPIN == "10000"
    chosen = {OMP_SPIN_ENV: "300000"}
    omp_spin(chosen, "transformers")
    assert chosen == {OMP_SPIN_ENV: "300000"}
    vllm: dict[str, str] = {}
    omp_spin(vllm, "vllm")
    assert vllm == {}
