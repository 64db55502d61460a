"""Which JetStream answers a KV operation waits out (``sllm.nats_kv.retrying``) and how a
permanent one is reported. Pure logic: the bus is a stand-in that is always connected."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from nats.js.errors import BadRequestError, ServiceUnavailableError

from sllm.errors import Unavailable
from sllm.nats_kv import retrying

CONNECTED: Any = SimpleNamespace(nc=SimpleNamespace(is_connected=True))


def failing(*errors: Exception) -> Any:
    """An operation that raises ``errors`` in turn, then answers "done"."""
    pending = list(errors)

    async def op() -> str:
        if pending:
            raise pending.pop(0)
        return "done"

    return op


async def test_a_cluster_still_placing_its_peers_is_waited_out() -> None:
    """Error 10005 is a 400, but a cluster that has just elected its meta leader answers it
    to a replicated create until every peer has reported in."""
    no_peers = BadRequestError(code=400, err_code=10005, description="no suitable peers")
    no_leader = ServiceUnavailableError(code=503, err_code=10008, description="no leader")
    op = failing(no_peers, no_leader, no_peers)
    assert await retrying("open kv bucket f", op, CONNECTED, 5.0) == "done"


async def test_a_bad_request_fails_at_once_naming_jetstreams_reason() -> None:
    bad = BadRequestError(code=400, err_code=10052, description="invalid stream config")
    with pytest.raises(
        Unavailable, match="open kv bucket f: BadRequestError 10052: invalid stream"
    ):
        await retrying("open kv bucket f", failing(bad), CONNECTED, 5.0)


async def test_peers_that_stay_away_end_at_the_deadline_with_the_reason() -> None:
    no_peers = BadRequestError(code=400, err_code=10005, description="no suitable peers")
    with pytest.raises(Unavailable, match=r"did not take it for 0s .*no suitable peers"):
        await retrying("open kv bucket f", failing(*[no_peers] * 100), CONNECTED, 0.2)
