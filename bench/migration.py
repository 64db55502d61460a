"""Live migration benchmark (issue 7): migration time and the pause a client sees, against the
number of tokens so far, compared with preempt-and-restart; the fitted cost model a, b.

    .venv/bin/python bench/migration.py --json bench/.data/migration.json

Starts a nats-server and one real node (``sllm node start``, two CPU slots) serving two
instances of a Llama-shaped random model (a local-directory store). Per token count N and
repetition, one greedy stream (``ignore_eos``, N + 400 tokens) runs on instance S:

- ``migrate``: when the client has N tokens, the node gets ``migrate`` S -> D (the real command
  path: rounds, switch); the client's stream is spliced with the gateway's own code
  (``follow_moves`` + ``StreamResumer``). Measured: the command's time (``total_s``), the
  protocol's rounds and switch, and the largest gap between two tokens at the client
  (``pause_s``; ``gap_s`` is the median gap, i.e. one decoding step).
- ``restart``: the request, preempted at N tokens, restarts on D with its prompt and the N
  tokens it had as one prompt (the client holds their text): the pause is the time from the
  resubmission until the next token arrives, i.e. one prefill of prompt + N tokens and one
  step (the preemption itself is not counted). ``redecode``, for reference, restarts from the
  prompt alone and decodes the N tokens again one step at a time (its stream is also the
  reference the migrated output is compared with). Loading the model on D is not included
  (``load_s`` is reported apart:
  command to ready of an instance, pre-started process, checkpoint in DRAM) and would add to
  the restart's pause where no instance of the model runs on D yet; migration needs a loaded
  target too, so the comparison of pauses is fair without it.

The directions alternate (S and D swap) so each instance serves both roles. Output tokens of
the migrated stream are compared with the restarted run's (greedy: identical).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

# Run as a script, this folder comes first on sys.path, and bench/gateway.py would shadow the
# gateway package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
# The repository root, for tests/tiny_model.py (a test fixture, not a shipped module).
sys.path.append(str(Path(__file__).resolve().parent.parent))

from gateway.migration.resume import StreamResumer  # noqa: E402
from gateway.migration.splice import follow_moves  # noqa: E402
from gateway.scheduler.estimators import MigrationModel  # noqa: E402
from sllm.instance_auth import auth_header  # noqa: E402
from sllm.messages import (  # noqa: E402
    EVENTS,
    HEARTBEATS,
    CmdReply,
    InstanceEvent,
    LoadCmd,
    MigrateCmd,
    decode_as,
    encode,
    node_cmd_subject,
)
from sllm.nats_auth import NatsCredentials  # noqa: E402
from sllm.nats_bus import NatsBus  # noqa: E402
from sllm.spec import FunctionRecord, FunctionSpec  # noqa: E402
from sllm_cli.servers import nats_client_env, start_nats  # noqa: E402

KEY = "checkpoints/bench/migration"
PROMPT = "Once upon a time in a land far away, "
# Decoded after the trigger: ~2-4 s here, so the switch (under a second) lands mid-stream and
# its pause is seen between two live tokens.
TAIL_TOKENS = 400


def build_model(root: Path) -> tuple[Path, int]:
    from runtime.ckpt.convert import convert_checkpoint
    from tests.tiny_model import TinyConfig, build_tiny_llama

    config = TinyConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    )
    hf = build_tiny_llama(root / "hf", seed=0, config=config)
    index = convert_checkpoint(hf, root / "ckpt")
    return root / "ckpt", index.total_bytes


async def stream_tokens(
    http: httpx.AsyncClient,
    address: str,
    body: dict[str, Any],
    at: int,
    on_at: Any,
    secrets: dict[str, str],
) -> tuple[list[int], list[float]]:
    """Stream ``body`` from ``address`` through the gateway's splicing; calls ``on_at()``
    (a coroutine function) once ``at`` tokens arrived. Returns token ids and arrival times.
    ``secrets``: each instance's secret by address (as the gateway keeps them)."""
    headers = auth_header(secrets[address])
    request = http.build_request("POST", f"{address}/v1/generate", json=body, headers=headers)
    response = await http.send(request, stream=True)
    assert response.status_code == 200, await response.aread()
    tokens: list[int] = []
    times: list[float] = []
    task: asyncio.Task[Any] | None = None
    buffer = b""
    try:
        chunks = response.aiter_raw()
        async for chunk in follow_moves(
            b"", chunks, StreamResumer(http, [address], lambda a: secrets.get(a, ""))
        ):
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                data = event[6:]
                if data == b"[DONE]":
                    continue
                payload = json.loads(data)
                if "error" in payload:
                    raise RuntimeError(f"stream error: {payload}")
                if "token_ids" in payload:
                    now = time.perf_counter()
                    tokens.extend(payload["token_ids"])
                    times.extend([now] * len(payload["token_ids"]))
                    if len(tokens) >= at and task is None and on_at is not None:
                        task = asyncio.create_task(on_at())
    finally:
        await response.aclose()
    if task is not None:
        await task
    return tokens, times


class Bench:
    def __init__(self, bus: NatsBus, node: str, http: httpx.AsyncClient, tokenizer: Any) -> None:
        self.bus, self.node, self.http = bus, node, http
        self.tokenizer = tokenizer
        self.events: asyncio.Queue[InstanceEvent] = asyncio.Queue()
        self.secrets: dict[str, str] = {}  # instance address -> its secret

    async def command(self, message: object, timeout_s: float = 120.0) -> CmdReply:
        raw = await self.bus.request(node_cmd_subject(self.node), encode(message), timeout_s)
        return decode_as(raw, CmdReply)

    async def load(self, instance_id: str, device: str, nbytes: int) -> tuple[str, float]:
        spec = FunctionSpec(name="bench", model="bench", handler="completion")
        record = FunctionRecord(spec=spec, checkpoint=KEY, checkpoint_bytes=nbytes).to_dict()
        started = time.perf_counter()
        reply = await self.command(LoadCmd(instance_id, "bench", record, device))
        assert reply.ok, reply
        while True:
            event = await asyncio.wait_for(self.events.get(), 300)
            if event.instance_id == instance_id:
                assert event.kind == "ready" and event.address, event
                self.secrets[event.address] = event.secret
                return event.address, time.perf_counter() - started

    async def migrate_run(
        self, n: int, source: tuple[str, str], target: tuple[str, str]
    ) -> dict[str, Any]:
        body = self.body(n)
        outcome: dict[str, Any] = {}

        async def migrate() -> None:
            cmd = MigrateCmd(
                source[0], uuid.uuid4().hex[:8], self.node, target[0], target[1],
                target_secret=self.secrets[target[1]],
            )  # fmt: skip
            started = time.perf_counter()
            reply = await self.command(cmd)
            assert reply.ok, reply
            outcome.update(reply.data, total_s=time.perf_counter() - started)

        tokens, times = await stream_tokens(self.http, source[1], body, n, migrate, self.secrets)
        gaps = [b - a for a, b in itertools.pairwise(times) if b > a]
        after = [b - a for a, b in zip(times[n - 1 :], times[n:], strict=False)]
        return {
            "tokens_at_switch": outcome["tokens"],  # prompt + output: the model's t_in + t_out
            "total_s": outcome["total_s"],
            "rounds": outcome["rounds"],
            "rounds_s": outcome["rounds_s"],
            "switch_s": outcome["switch_s"],
            "moved": outcome["moved"],
            "pause_s": max(after) if after else 0.0,
            "gap_s": statistics.median(gaps) if gaps else 0.0,
            "ids": tokens,
        }

    async def redecode_run(self, n: int, target: tuple[str, str]) -> dict[str, Any]:
        """The request preempted at N tokens restarts from its prompt alone on ``target``: the
        pause runs from the resubmission to token N + 1 (the N tokens are decoded again)."""
        started = time.perf_counter()
        ids, times = await stream_tokens(self.http, target[1], self.body(n), 0, None, self.secrets)
        return {"pause_s": times[n] - started, "ids": ids}

    async def restart_run(self, n: int, ids: list[int], target: tuple[str, str]) -> dict[str, Any]:
        """The request preempted at N tokens restarts on ``target`` with prompt + its N tokens
        as one prompt: the pause is one prefill and a step, to the first new token."""
        text = PROMPT + self.tokenizer.decode(ids[:n])
        body = {**self.body(0), "prompt": text, "max_tokens": 1}
        started = time.perf_counter()
        _, times = await stream_tokens(self.http, target[1], body, 0, None, self.secrets)
        prompt_tokens = len(self.tokenizer(text).input_ids)
        return {"pause_s": times[0] - started, "prompt_tokens": prompt_tokens}

    @staticmethod
    def body(n: int) -> dict[str, Any]:
        return {
            "prompt": PROMPT,
            "max_tokens": n + TAIL_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }


def median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r[key]) for r in rows)


def start_node(root: Path) -> tuple[Any, subprocess.Popen[bytes], dict[str, str], int]:
    """(nats server, node process, node env, checkpoint bytes): the model in a local store."""
    from runtime.store.local import LocalStore
    from runtime.store.push import push_checkpoint

    ckpt, nbytes = build_model(root)
    store = root / "store"
    store.mkdir()
    push_checkpoint(ckpt, LocalStore(store), KEY)
    # NATS as the platform runs it: with credentials (the node's here, the bench's below)
    nats = start_nats(root / "nats", credentials=NatsCredentials(root / "nats-creds"))
    node_id = f"bench-mig-{os.getpid()}"
    env = {
        **os.environ,
        **nats_client_env(nats, node_id),
        "SLLM_NODE_ID": node_id,
        "SLLM_STORE_URL": str(store),
        "SLLM_CACHE_DIR": str(root / "cache"),
        "SLLM_DRAM_CAPACITY": "512Mi",
        "SLLM_SSD_CAPACITY": "512Mi",
        "SLLM_CPU_SLOTS": "2",
        "SLLM_POOL_SIZE": "1",
        "SLLM_VLLM": "off",  # the transformers backend only: no vLLM process
        "SLLM_HEARTBEAT_INTERVAL": "1s",
    }
    with open(root / "node.log", "wb") as log:
        node = subprocess.Popen(
            [sys.executable, "-m", "sllm_cli.main", "node", "start", "--drain", "1s"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return nats, node, env, nbytes


def gateway_seed(nats: Any) -> str:
    """The bench talks to the node as the gateway does, with the gateway role's seed."""
    return nats_client_env(nats)["SLLM_NATS_SEED_FILE"]


async def run(args: argparse.Namespace, env: dict[str, str], nbytes: int) -> dict[str, Any]:
    node_id = env["SLLM_NODE_ID"]
    bus = await NatsBus.connect(
        env["SLLM_NATS_URL"], name="bench-migration", seed_file=env["BENCH_GATEWAY_SEED"]
    )
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=5)) as http:
            from transformers import AutoTokenizer

            bench = Bench(bus, node_id, http, AutoTokenizer.from_pretrained(args.ckpt))

            async def on_event(msg: Any) -> None:
                await bench.events.put(decode_as(msg.data, InstanceEvent))

            up = asyncio.Event()

            async def on_heartbeat(msg: Any) -> None:
                up.set()  # the node subscribes to its commands before it beats

            await bus.subscribe(EVENTS, on_event)
            await bus.subscribe(HEARTBEATS, on_heartbeat)
            await asyncio.wait_for(up.wait(), 120)
            a_addr, load_a = await bench.load("bench-a", "cpu:0", nbytes)
            b_addr, load_b = await bench.load("bench-b", "cpu:1", nbytes)
            pair = [("bench-a", a_addr), ("bench-b", b_addr)]
            rows: list[dict[str, Any]] = []
            fit = MigrationModel()
            for n in args.tokens:
                for rep in range(args.repeat):
                    source, target = pair[rep % 2], pair[1 - rep % 2]
                    moved = await bench.migrate_run(n, source, target)
                    redecoded = await bench.redecode_run(n, target)
                    restarted = await bench.restart_run(n, redecoded["ids"], target)
                    same = moved.pop("ids") == redecoded.pop("ids")
                    row = {
                        "n": n,
                        "rep": rep,
                        **moved,
                        "restart_pause_s": restarted["pause_s"],
                        "restart_prompt_tokens": restarted["prompt_tokens"],
                        "redecode_pause_s": redecoded["pause_s"],
                    }
                    row["identical_output"] = same
                    rows.append(row)
                    if moved["moved"]:
                        fit.observe(moved["tokens_at_switch"], moved["total_s"])
                    print(json.dumps(row), flush=True)
            summary = []
            for n in args.tokens:
                mine = [r for r in rows if r["n"] == n and r["moved"]]
                if not mine:
                    continue
                summary.append(
                    {
                        "tokens_so_far": n,
                        "moved_runs": f"{len(mine)}/{args.repeat}",
                        "tokens_at_switch": median(mine, "tokens_at_switch"),
                        "migration_total_s": median(mine, "total_s"),
                        "migration_pause_s": median(mine, "pause_s"),
                        "decode_gap_s": median(mine, "gap_s"),
                        "rounds": median(mine, "rounds"),
                        "restart_pause_s": median(mine, "restart_pause_s"),
                        "restart_pause_with_load_s": median(mine, "restart_pause_s")
                        + statistics.median([load_a, load_b]),
                        "redecode_pause_s": median(mine, "redecode_pause_s"),
                        "identical_output": all(r["identical_output"] for r in mine),
                    }
                )
            ab = fit.fit()
            return {
                "model": {"params_bytes": nbytes, "layers": 6, "hidden": 256},
                "load_s": statistics.median([load_a, load_b]),
                "summary": summary,
                "fit": {"a_s_per_token": ab.a, "b_s": ab.b},
                "rows": rows,
                "machine": "2 cores, no GPU; shared with other developers' work",
                "load_average_end": os.getloadavg()[0],
            }
    finally:
        await bus.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--tokens",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[64, 256, 1024, 2048],
        help="output tokens so far at the switch (comma-separated)",
    )
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sllm-bench-migration-"))
    nats, node, env, nbytes = start_node(root)
    args.ckpt = root / "ckpt"
    try:
        result = asyncio.run(run(args, {**env, "BENCH_GATEWAY_SEED": gateway_seed(nats)}, nbytes))
    finally:
        from runtime.node.main import dram_root
        from sllm.settings import NodeSettings

        node.send_signal(signal.SIGTERM)
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.kill()
        nats.stop()
        shutil.rmtree(dram_root(NodeSettings.from_env(env)), ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    text = json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
