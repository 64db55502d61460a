"""Hosts as network namespaces (``sllm_cli.netns``): made by the tests, removed by them, even when a
test fails. Needs root and iproute2 (``ip``, ``tc``), as CI and this machine have."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator

import pytest

from sllm_cli import netns


def _can_make_hosts() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    return None


MakeTopology = Callable[..., netns.Topology]


@pytest.fixture(scope="module")
def make_topology() -> Iterator[MakeTopology]:
    """``make_topology(names, shape)`` -> a ``Topology``, removed when the module is done."""
    reason = _can_make_hosts()
    if reason is not None:
        pytest.skip(reason)
    made: list[netns.Topology] = []

    def make(
        names: list[str], shape: netns.LinkShape | dict[str, netns.LinkShape]
    ) -> netns.Topology:
        topo = netns.create(names, shape)
        made.append(topo)
        return topo

    yield make
    for topo in made:
        topo.remove()
