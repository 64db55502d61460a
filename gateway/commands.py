"""Commands to nodes over the bus (request-reply on ``sllm.node.<id>.cmd``), acked by a
``CmdReply``. A reply with ``ok=False``, a malformed reply or no reply in time raises
``CommandFailed`` naming the node and the reason."""

from __future__ import annotations

from sllm.bus import Bus
from sllm.errors import ProtocolError, SllmError
from sllm.messages import CmdReply, LoadCmd, UnloadCmd, decode_as, encode, node_cmd_subject


class CommandFailed(SllmError):
    code = "command_failed"
    status = 502


class NodeCommands:
    def __init__(self, bus: Bus, timeout_s: float) -> None:
        self._bus = bus
        self._timeout_s = timeout_s

    async def send(self, node: str, command: LoadCmd | UnloadCmd) -> CmdReply:
        kind = type(command).__name__
        try:
            raw = await self._bus.request(node_cmd_subject(node), encode(command), self._timeout_s)
            reply = decode_as(raw, CmdReply)
        except TimeoutError:
            raise CommandFailed(
                f"{kind} to node {node}: no reply within {self._timeout_s:g}s"
            ) from None
        except ProtocolError as exc:
            raise CommandFailed(f"{kind} to node {node}: bad reply: {exc.message}") from None
        if not reply.ok:
            raise CommandFailed(f"{kind} to node {node} refused: {reply.code}: {reply.message}")
        return reply
