"""Resource limits written into a running container's cgroup (v1 or v2).

A pre-started container is started before the node knows its function, so the function's
limits (``resources`` in function.yaml) are set when it gets its load: a few file writes,
instead of ``podman update`` (a process start, ~0.1-0.3 s here).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CFS_PERIOD_US = 100_000


def cgroup_dirs(pid: int, root: Path = CGROUP_ROOT) -> dict[str, Path]:
    """Controller -> cgroup directory of ``pid`` ("" for the v2 unified hierarchy)."""
    dirs: dict[str, Path] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text(encoding="utf-8").splitlines():
        _, controllers, path = line.split(":", 2)
        if not controllers:
            if (root / "cgroup.controllers").is_file():  # pure v2
                dirs[""] = root / path.lstrip("/")
            continue
        for controller in controllers.split(","):
            mount = root / controllers if (root / controllers).is_dir() else root / controller
            dirs[controller] = mount / path.lstrip("/")
    return dirs


def set_limits(pid: int, memory_bytes: int, cpus: int, root: Path = CGROUP_ROOT) -> None:
    """Limit ``pid``'s cgroup to ``memory_bytes`` of memory (no swap beyond it) and ``cpus``
    cores (0: no CPU limit). OSError when the kernel refuses, e.g. a limit below what the
    container already uses."""
    dirs = cgroup_dirs(pid, root)
    if "" in dirs:
        unified = dirs[""]
        (unified / "memory.max").write_text(str(memory_bytes))
        if (unified / "memory.swap.max").exists():
            (unified / "memory.swap.max").write_text("0")
        if cpus > 0:
            (unified / "cpu.max").write_text(f"{cpus * CFS_PERIOD_US} {CFS_PERIOD_US}")
        return
    memory = dirs["memory"]
    # memory before memory+swap: the kernel keeps limit_in_bytes <= memsw.limit_in_bytes
    (memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
    if (memory / "memory.memsw.limit_in_bytes").exists():
        (memory / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
    if cpus > 0 and "cpu" in dirs:
        (dirs["cpu"] / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
        (dirs["cpu"] / "cpu.cfs_quota_us").write_text(str(cpus * CFS_PERIOD_US))


# a background cgroup's CPU weight against its siblings, and a normal one: v1 ``cpu.shares``
# (its least, 2) and v2 ``cpu.weight`` (its least, 1), the kernel's defaults for normal
SHARES = {True: 2, False: 1024}
WEIGHT = {True: 1, False: 100}


def set_background(pid: int, background: bool, root: Path = CGROUP_ROOT) -> None:
    """Weigh ``pid``'s cgroup (a container's) against its siblings (the other containers) as a
    background one or a normal one. SCHED_IDLE and nice rank threads within one cgroup only:
    an idle container at equal weight takes as much CPU as an instance's (runtime.node.
    priority). OSError when the kernel refuses; nothing where the cgroup has no CPU
    controller."""
    dirs = cgroup_dirs(pid, root)
    if "" in dirs:
        path, value = dirs[""] / "cpu.weight", WEIGHT[background]
    elif "cpu" in dirs:
        path, value = dirs["cpu"] / "cpu.shares", SHARES[background]
    else:
        return
    if path.exists():
        path.write_text(str(value))


class OomWatch:
    """Notices the kernel's OOM killer in a container's memory cgroup (v1: an eventfd
    registered on memory.oom_control, which fires while the cgroup still exists, so its
    ``oom_kill`` count can be read then; v2: ``memory.events`` read at the notification or
    at exit). The count is gone once the engine removes the cgroup, hence the event."""

    def __init__(self, events: Path, eventfd: int, control_fd: int) -> None:
        self.events = events
        self.fd = eventfd
        self._control_fd = control_fd
        self.killed = False

    @staticmethod
    def open(pid: int, root: Path = CGROUP_ROOT) -> OomWatch | None:
        dirs = cgroup_dirs(pid, root)
        if "" in dirs:
            return OomWatch(dirs[""] / "memory.events", -1, -1)
        memory = dirs.get("memory")
        if memory is None:
            return None
        eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        control = os.open(memory / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        try:
            (memory / "cgroup.event_control").write_text(f"{eventfd} {control}")
        except OSError:
            os.close(eventfd)
            os.close(control)
            return None
        return OomWatch(memory / "memory.oom_control", eventfd, control)

    def check(self) -> bool:
        """Drain the notification and read the cgroup's state; True once an OOM was seen.
        v1 notifies as the cgroup runs out of memory, before its ``oom_kill`` count moves,
        and again when the cgroup is removed, when its files are gone: a notification
        while the file still reads is an OOM."""
        notified = False
        if self.fd >= 0:
            with contextlib.suppress(BlockingIOError, OSError):
                notified = os.eventfd_read(self.fd) > 0
        try:
            text = self.events.read_text()
        except OSError:
            return self.killed  # the cgroup is gone (removed with its container)
        if notified:
            self.killed = True
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill" and value.strip().isdigit() and int(value) > 0:
                self.killed = True
        return self.killed

    def close(self) -> None:
        for fd in (self.fd, self._control_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self._control_fd = -1
