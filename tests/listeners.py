"""Which process listens on an address, so a test can signal it (SIGSTOP, SIGKILL) by pid."""

from __future__ import annotations

import psutil


def pid_on(address: str) -> int:
    """The pid of the process listening on ``address`` ("http://host:port"), e.g. an instance."""
    port = int(address.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == "LISTEN" and conn.pid:
            return conn.pid
    raise AssertionError(f"nothing listens on {address}")
