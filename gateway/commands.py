"""Commands to nodes over the bus (request-reply on ``sllm.node.<id>.cmd``), acked by a
``CmdReply``. A reply with ``ok=False``, a malformed reply or no reply in time raises
``CommandFailed`` naming the node and the reason.

``CommandFailed.transient`` says whether trying again later (or elsewhere) can succeed: no
reply, nobody listening (``node_gone``: the node's process is not running), NATS down, or a
refusal for a passing reason (no free device, the node draining, a device still in use). A
malformed command or record is not transient: it would be refused again."""

from __future__ import annotations

import logging

from sllm.bus import Bus, NoResponder
from sllm.errors import ProtocolError, SllmError, Unavailable
from sllm.messages import (
    CmdReply,
    LoadCmd,
    MigrateCmd,
    PrepareCmd,
    UnloadCmd,
    decode_as,
    encode,
    node_cmd_subject,
)
from sllm.spec import FunctionRecord

log = logging.getLogger(__name__)

# 10 s: a node acks a load when it accepts it; the load itself is reported by an event.
COMMAND_TIMEOUT_S = 10.0
# Refusals that say nothing against trying again (sllm/messages.py, docs/runtime.md).
_DEFINITIVE = frozenset({"protocol_error", "validation_failed"})


class CommandFailed(SllmError):
    code = "command_failed"
    status = 502

    def __init__(self, message: str, *, transient: bool, node_gone: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        self.node_gone = node_gone


class NodeCommands:
    """The one way the gateway sends a node a command and reads its ``CmdReply``."""

    def __init__(self, bus: Bus, timeout_s: float) -> None:
        self._bus = bus
        self._timeout_s = timeout_s

    async def send(
        self, node: str, command: LoadCmd | UnloadCmd | MigrateCmd, timeout_s: float | None = None
    ) -> CmdReply:
        """``command`` to ``node``, its ``ok`` reply within ``timeout_s`` (default: the one
        given at construction); else ``CommandFailed``."""
        kind = type(command).__name__
        timeout_s = self._timeout_s if timeout_s is None else timeout_s
        try:
            raw = await self._bus.request(node_cmd_subject(node), encode(command), timeout_s)
            reply = decode_as(raw, CmdReply)
        except NoResponder:
            raise CommandFailed(
                f"{kind} to node {node}: the node is not running (nobody listens)",
                transient=True,
                node_gone=True,
            ) from None
        except TimeoutError:
            raise CommandFailed(
                f"{kind} to node {node}: no reply within {timeout_s:g}s", transient=True
            ) from None
        except Unavailable as exc:
            raise CommandFailed(f"{kind} to node {node}: {exc.message}", transient=True) from None
        except ProtocolError as exc:
            raise CommandFailed(
                f"{kind} to node {node}: bad reply: {exc.message}", transient=False
            ) from None
        if not reply.ok:
            raise CommandFailed(
                f"{kind} to node {node} refused: {reply.code}: {reply.message}",
                transient=reply.code not in _DEFINITIVE,
            )
        return reply

    async def announce(self, record: FunctionRecord, nodes: list[str]) -> None:
        """Tell ``nodes`` a function with Python requirements was deployed, so nodes running
        instances in containers build its image now: a PrepareCmd published on each node's
        command subject, no reply awaited. Best effort: a node that misses it builds the image
        at the function's first load."""
        if not record.requirements.strip():
            return
        payload = encode(PrepareCmd(record.spec.name, record.to_dict()))
        for node in nodes:
            try:
                await self._bus.publish(node_cmd_subject(node), payload)
            except Exception as exc:
                log.warning("could not announce %s to node %s: %s", record.spec.name, node, exc)
