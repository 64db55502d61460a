"""Gateway overhead benchmark (issue 5): the latency the gateway adds to a warm request, and
the requests per second it sustains, against a trivially fast backend.

    .venv/bin/python bench/gateway.py --json bench/.data/gateway.json

Real parts: nats-server (JetStream), `sllm gateway start` as a child process, a backend process
speaking the Instance API (a tiny Starlette app on uvicorn answering at once: the gateway's cost
is all that differs), and a scripted node in this process that answers the gateway's load
command with the backend's address. The load generator runs in this process too, on loopback
with keep-alive connections (``Connection``).

- ``latency``: one request at a time, alternating blocks of direct (backend ``/v1/invoke``) and
  gateway (``POST /function/bench``) requests so drift hits both; p50/p99 of each and of the
  difference.
- ``rps``: ``--concurrency`` clients in a closed loop for ``--seconds``, through the gateway and
  direct.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from sllm.bus import Message
from sllm.instance_auth import new_secret
from sllm.messages import (
    CmdReply,
    DeviceState,
    InstanceEvent,
    InstanceState,
    LoadCmd,
    NodeHeartbeat,
    decode,
    encode,
    event_subject,
    heartbeat_subject,
    node_cmd_subject,
)
from sllm.nats_auth import NatsCredentials
from sllm.nats_bus import NatsBus
from sllm_cli.servers import free_port, nats_client_env, port_open, start_nats

TOKEN = "bench-token"
ANSWER = {
    "id": "r",
    "text": "ok",
    "finish_reason": "stop",
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}
PAYLOAD = {"prompt": "hello", "max_tokens": 1}


def serve_backend(port: int) -> None:
    """The trivially fast instance: answers generate/invoke at once."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def answer(request: Request) -> Response:
        await request.body()
        return JSONResponse(ANSWER)

    async def healthz(request: Request) -> Response:
        return JSONResponse(
            {"state": "ready", "function": "bench", "instance_id": "b0", "in_flight": 0}
        )

    app = Starlette(
        routes=[
            Route("/v1/invoke", answer, methods=["POST"]),
            Route("/v1/generate", answer, methods=["POST"]),
            Route("/healthz", healthz),
        ]
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


class ScriptedNode:
    """Answers the gateway's load with the backend's address (no model)."""

    def __init__(self, bus: NatsBus, address: str) -> None:
        self.bus, self.address = bus, address
        self.instances: list[InstanceState] = []
        self.seq = 0

    async def start(self) -> None:
        await self.bus.subscribe(node_cmd_subject("bench-node"), self.on_cmd)

    async def beat(self) -> None:
        while True:
            self.seq += 1
            used = {i.device: i.instance_id for i in self.instances}
            devices = [DeviceState("cpu0", "cpu", 2**30, used.get("cpu0"))]
            hb = NodeHeartbeat("bench-node", self.seq, devices, self.instances, {}, {})
            await self.bus.publish(heartbeat_subject("bench-node"), encode(hb))
            await asyncio.sleep(1.0)

    async def on_cmd(self, msg: Message) -> bytes:
        cmd = decode(msg.data)
        if isinstance(cmd, LoadCmd):
            # a secret, as a real node gives its instances: the gateway sends it on every call
            # (the path measured is the path that serves); the trivial backend ignores it
            secret = new_secret()
            state = InstanceState(
                cmd.instance_id, cmd.function, cmd.device, "ready", self.address, 0, secret=secret
            )
            self.instances = [state]
            event = InstanceEvent(
                "ready", cmd.instance_id, "bench-node", cmd.function, self.address, tier="dram",
                secret=secret,
            )  # fmt: skip
            subject = event_subject("bench-node")
            asyncio.get_running_loop().call_later(
                0.05, lambda: asyncio.ensure_future(self.bus.publish(subject, encode(event)))
            )
        return encode(CmdReply(ok=True))


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while not port_open("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start on port {port}")
        time.sleep(0.05)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Connection:
    """A keep-alive HTTP/1.1 connection posting one fixed JSON body (the load generator: httpx's
    own per-request cost was larger than the gateway's and degraded with concurrency)."""

    def __init__(self, url: str, body: bytes) -> None:
        origin, _, path = url.removeprefix("http://").partition("/")
        self.host, port = origin.split(":")
        self.port = int(port)
        self.request = (
            f"POST /{path} HTTP/1.1\r\nhost: {origin}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self) -> int:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(
            int(x.split(b":")[1]) for x in lines if x.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        return int(lines[0].split(b" ")[1])

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()


async def latency(direct: str, gateway: str, n: int) -> dict[str, Any]:
    body = json.dumps(PAYLOAD).encode()
    connections = {"direct": Connection(direct, body), "gateway": Connection(gateway, body)}
    times: dict[str, list[float]] = {"direct": [], "gateway": []}
    block = 50
    for start in range(0, n, block):
        for name, conn in connections.items():
            for _ in range(min(block, n - start)):
                t0 = time.perf_counter()
                status = await conn.post()
                times[name].append(time.perf_counter() - t0)
                if status != 200:
                    raise SystemExit(f"{name} answered {status}")
    for conn in connections.values():
        conn.close()
    d, g = times["direct"], times["gateway"]
    return {
        "n": n,
        "direct_p50_ms": round(1000 * statistics.median(d), 3),
        "direct_p99_ms": round(1000 * pct(d, 0.99), 3),
        "gateway_p50_ms": round(1000 * statistics.median(g), 3),
        "gateway_p99_ms": round(1000 * pct(g, 0.99), 3),
        "added_p50_ms": round(1000 * (statistics.median(g) - statistics.median(d)), 3),
        "added_p99_ms": round(1000 * (pct(g, 0.99) - pct(d, 0.99)), 3),
    }


async def rps(url: str, concurrency: int, seconds: float) -> dict[str, float]:
    """Closed loop: ``concurrency`` workers, one keep-alive connection each."""
    body = json.dumps(PAYLOAD).encode()
    done = errors = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done, errors
        conn = Connection(url, body)
        while time.perf_counter() < stop:
            if await conn.post() == 200:
                done += 1
            else:
                errors += 1
        conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return {"rps": round(done / elapsed, 1), "errors": errors, "seconds": round(elapsed, 2)}


async def run(
    args: argparse.Namespace, nats_env: dict[str, str], gateway_url: str, backend: str
) -> dict[str, Any]:
    bus = await NatsBus.connect(
        nats_env["SLLM_NATS_URL"], "bench-node", seed_file=nats_env["SLLM_NATS_SEED_FILE"]
    )
    node = ScriptedNode(bus, backend)
    await node.start()
    beat = asyncio.create_task(node.beat())
    auth = {"authorization": f"Bearer {TOKEN}"}
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            deadline = time.monotonic() + 30
            while (await client.get(f"{gateway_url}/healthz")).json()["nodes"] < 1:
                if time.monotonic() > deadline:
                    raise SystemExit("the gateway never saw the scripted node")
                await asyncio.sleep(0.1)
            spec = {
                "name": "bench",
                "model": "none",
                "handler": "completion",
                "auth": "public",
                "scale": {"min": 0, "max": 1, "keep_alive": "1h"},
            }
            r = await client.post(
                f"{gateway_url}/system/functions",
                headers=auth,
                json={"spec": spec, "checkpoint": "k", "checkpoint_bytes": 1},
            )
            if r.status_code not in (201, 409):
                raise SystemExit(f"deploy failed: {r.status_code} {r.text}")
            t0 = time.perf_counter()
            r = await client.post(f"{gateway_url}/function/bench", json=PAYLOAD)
            cold_ms = 1000 * (time.perf_counter() - t0)
            if r.status_code != 200:
                raise SystemExit(f"first request failed: {r.status_code} {r.text}")
            for _ in range(200):  # warm both paths (connections, code)
                await client.post(f"{gateway_url}/function/bench", json=PAYLOAD)
                await client.post(f"{backend}/v1/invoke", json=PAYLOAD)
        runs = [
            await latency(f"{backend}/v1/invoke", f"{gateway_url}/function/bench", args.n)
            for _ in range(args.repeats)
        ]
        through = [
            await rps(f"{gateway_url}/function/bench", args.concurrency, args.seconds)
            for _ in range(args.repeats)
        ]
        direct = [
            await rps(f"{backend}/v1/invoke", args.concurrency, args.seconds)
            for _ in range(args.repeats)
        ]
    finally:
        beat.cancel()
        await bus.close()
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "n"}
    return {
        "latency": {
            **{k: round(v, 3) for k, v in med.items()},
            "n_per_run": args.n,
            "runs": runs,
        },
        "rps": {
            "concurrency": args.concurrency,
            "gateway_rps": statistics.median(r["rps"] for r in through),
            "direct_rps": statistics.median(r["rps"] for r in direct),
            "gateway_runs": through,
            "direct_runs": direct,
        },
        "first_request_ms": round(cold_ms, 1),
        "target_added_p50_ms": 2.0,
        "meets_target": med["added_p50_ms"] < 2.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--n", type=int, default=2000, help="sequential requests per path per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs; medians are reported")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--serve-backend", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_backend:
        serve_backend(args.serve_backend)
        return 0
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="sllm-bench-gw-") as tmp:
        nats = start_nats(Path(tmp) / "nats", credentials=NatsCredentials(Path(tmp) / "creds"))
        try:
            backend_port, gateway_port = free_port(), free_port()
            backend = subprocess.Popen(
                [sys.executable, __file__, "--serve-backend", str(backend_port)]
            )
            procs.append(backend)
            env = dict(
                os.environ,
                **nats_client_env(nats),
                SLLM_TOKEN=TOKEN,
                SLLM_GATEWAY_PORT=str(gateway_port),
                SLLM_POLICY="least-loaded",
                SLLM_STORE_URL=str(Path(tmp) / "store"),
            )
            sllm = str(Path(sys.executable).parent / "sllm")
            gateway = subprocess.Popen(
                [sllm, "gateway", "start", "--log-level", "warning"], env=env
            )
            procs.append(gateway)
            wait_port(backend_port, backend, "backend")
            wait_port(gateway_port, gateway, "gateway")
            result = asyncio.run(
                run(
                    args,
                    nats_client_env(nats, "bench-node"),
                    f"http://127.0.0.1:{gateway_port}",
                    f"http://127.0.0.1:{backend_port}",
                )
            )
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=10)
            nats.stop()
    result["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
