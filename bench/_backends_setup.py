"""What bench/backends.py and bench/vllm_built.py run on: the platform (nats-server, gateway, one
node), the peer (plain vLLM's OpenAI server) and the two models. Models, made once under
bench/.data/backends: SmolLM2-135M-Instruct (the demo's GGUF through sllm's converter, exported
as a Hugging Face safetensors directory for the peer) and a random Llama of ~1.1B parameters
with SmolLM2's tokenizer (bfloat16)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

DATA = Path(__file__).resolve().parent / ".data" / "backends"
MODELS = ("smollm2", "llama1b")
TOKEN = "bench-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def export_hf(ckpt: Path, dst: Path) -> Path:
    """An sllm checkpoint as a Hugging Face safetensors directory (what the peer loads)."""
    from safetensors.torch import save_file

    from runtime.ckpt.index import image_layout, read_index
    from runtime.loader.cpu import allocate_image, tensor_views, writable_view
    from runtime.loader.read import read_checkpoint

    if (dst / "model.safetensors").exists():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = read_index(ckpt)  # the one checkpoint reader (runtime/loader/read.py)
    image = allocate_image(image_layout(index)[1], touch=False)
    read_checkpoint(ckpt, index, writable_view(image))
    views = tensor_views(index, image)
    tensors = {k: v.clone() for k, v in views.items() if k not in index.aliases}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for name in index.files:
        shutil.copy(ckpt / name, tmp / name)
    tmp.rename(dst)
    return dst


def build_models() -> dict[str, Path]:
    """HF directories of both models (bfloat16), made once under bench/.data."""
    from tests.smollm2 import ensure_smollm2_checkpoint

    DATA.mkdir(parents=True, exist_ok=True)
    smol = export_hf(ensure_smollm2_checkpoint(DATA / "convert"), DATA / "hf-smollm2")
    big = DATA / "hf-llama1b"
    if not (big / "model.safetensors").exists():
        build_llama1b(smol, big)
    return {"smollm2": smol, "llama1b": big}


def build_llama1b(tokenizer_from: Path, dst: Path) -> None:
    """A random Llama of ~1.1B parameters with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation")):
            shutil.copy(f, tmp / f.name)
    tmp.rename(dst)


class Peer:
    """``python -m vllm.entrypoints.openai.api_server`` on one model."""

    def __init__(self, model: Path, root: Path, *, compiled: bool) -> None:
        from sllm_cli.servers import free_port

        self.model, self.port = str(model), free_port()
        # a compile cache per run (VLLM_CACHE_ROOT): the first compiled start compiles
        env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
               "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CACHE_ROOT": str(root / "vllm-cache")}  # fmt: skip
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                self.model, "--port", str(self.port), "--dtype", "bfloat16",
                "--max-model-len", "2048"] + ([] if compiled else ["--enforce-eager"])  # fmt: skip
        self.started = time.monotonic()
        with open(root / f"peer-{model.name}-{'compiled' if compiled else 'eager'}.log", "ab") as f:
            self.proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 1200.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, "the peer exited"
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the peer did not start"
            time.sleep(0.5)

    def stop(self) -> None:
        from sllm_cli.servers import stop_process

        stop_process(self.proc, 60)


# -- the platform ------------------------------------------------------------------------------
class Platform:
    """nats-server, gateway and one node (one CPU slot), a local-directory store."""

    def __init__(self, root: Path, vllm_pool_size: int = 1, vllm_spare: int = 1) -> None:
        from sllm.nats_auth import NatsCredentials
        from sllm_cli.servers import free_port, nats_client_env, start_nats

        self.root = root
        self.store = root / "store"
        self.store.mkdir(parents=True, exist_ok=True)
        self.nats = start_nats(root / "nats", credentials=NatsCredentials(root / "creds"))
        self.port = free_port()
        self.env = {**os.environ, **nats_client_env(self.nats), "SLLM_TOKEN": TOKEN,
                    "SLLM_STORE_URL": str(self.store), "SLLM_GATEWAY_PORT": str(self.port),
                    "SLLM_WAKE_TIMEOUT": "900s", "SLLM_REQUEST_TIMEOUT": "1800s",
                    "SLLM_SCALE_DOWN_WINDOW": "1s"}  # fmt: skip
        self.node_env = {**self.env, **nats_client_env(self.nats, "bench"),
                         "SLLM_NODE_ID": "bench", "SLLM_CACHE_DIR": str(root / "cache"),
                         "SLLM_CPU_SLOTS": "1", "SLLM_POOL_SIZE": "1", "SLLM_VLLM": "on",
                         "SLLM_VLLM_POOL_SIZE": str(vllm_pool_size),
                         "SLLM_VLLM_SPARE": str(vllm_spare), "SLLM_DRAM_CAPACITY": "8Gi",
                         "SLLM_SSD_CAPACITY": "10Gi", "SLLM_HEARTBEAT_INTERVAL": "0.5s"}  # fmt: skip
        self.gateway = self._spawn(["gateway", "start"], self.env, "gateway.log")
        self.node: subprocess.Popen[bytes] | None = None
        self.start_node()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, argv: list[str], env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
        with open(self.root / log, "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "sllm_cli.main", "-v", *argv],
                                    env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip

    def start_node(self) -> None:
        log = self.root / "node.log"
        self.log_mark = log.stat().st_size if log.exists() else 0  # this node's lines start here
        self.node = self._spawn(["node", "start", "--drain", "5s"], self.node_env, "node.log")
        self.wait_quiet()

    def wait_quiet(self, timeout_s: float = 600.0) -> None:
        """Until both pools are full again (a vLLM process imported, a transformers one warm)
        and, after a vLLM start, the idle vLLM process built its engine: what a load leaves
        running for a while (tens of seconds of CPU here), done before anything is measured."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                nodes = httpx.get(f"{self.url}/system/nodes", headers=AUTH, timeout=5).json()
                text = (self.root / "node.log").read_text(errors="replace")[self.log_mark :]
                started = text.rfind("backend=vllm engine=")  # -1: no vLLM instance yet
                # a prebuild vLLM refused (too little free memory here) settles it too
                done = max(text.rfind(m) for m in ("prebuilt a vLLM", "prebuilding a vLLM"))
                built = started < 0 or done > started
                full = any(n.get("pool_idle", 0) >= 1 + self.vllm_processes for n in nodes)
                if full and built:
                    self._wait_idle_cpu()
                    return
            except (httpx.HTTPError, ValueError):
                pass
            assert time.monotonic() < deadline, "the node did not settle"
            time.sleep(1)

    def _wait_idle_cpu(self, window_s: float = 2.0, busy_s: float = 0.2) -> None:
        """Until the node and its processes used under ``busy_s`` of CPU in ``window_s``: the
        other idle processes' engines built too (a pool of several vLLM processes)."""
        import psutil

        assert self.node is not None
        node = psutil.Process(self.node.pid)

        def cpu() -> float:
            total = 0.0
            for proc in [node, *node.children(recursive=True)]:
                try:
                    times = proc.cpu_times()
                except psutil.Error:
                    continue  # ended meanwhile
                total += times.user + times.system
            return total

        before = cpu()
        while True:
            time.sleep(window_s)
            now = cpu()
            if now - before < busy_s:
                return
            before = now

    def _last_vllm_ready(self) -> str:
        """The node's ready line of the latest vLLM instance."""
        text = (self.root / "node.log").read_text(errors="replace")[self.log_mark :]
        at = text.rfind("backend=vllm engine=")
        return text[text.rfind("\n", 0, at) + 1 :].split("\n", 1)[0] if at >= 0 else ""

    def _last_vllm_field(self, field: str) -> str:
        words = self._last_vllm_ready().split(" timings=", 1)[0].split()
        return next((w.removeprefix(f"{field}=") for w in words if w.startswith(f"{field}=")), "")

    def last_engine(self) -> str:
        """How the latest vLLM instance got its engine (built, kept, reloaded)."""
        return self._last_vllm_field("engine")

    def last_tier(self) -> str:
        """The tier the latest vLLM instance's checkpoint came from (dram, ssd, store)."""
        return self._last_vllm_field("tier")

    def last_timings(self) -> dict[str, float]:
        """The latest vLLM instance's load timings: how its weights came
        (``weights_bound_bytes``, ``weights_copied_bytes``), its KV cache, its build."""
        _, found, timings = self._last_vllm_ready().partition(" timings=")
        return dict(json.loads(timings)) if found else {}

    def stop_node(self) -> None:
        from sllm_cli.servers import stop_process

        if self.node is not None:
            stop_process(self.node, 60)
            self.node = None

    def dram_root(self) -> Path:
        from runtime.node.main import dram_root
        from sllm.settings import NodeSettings

        return dram_root(NodeSettings.from_env(self.node_env))

    def restart_with(self, env: dict[str, str]) -> None:
        """The node restarted with ``env`` added to its environment (an empty value removes
        the variable); its tiers stay (DRAM, SSD)."""
        self.stop_node()
        for key, value in env.items():
            if value:
                self.node_env[key] = value
            else:
                self.node_env.pop(key, None)
        self.start_node()

    @property
    def vllm_processes(self) -> int:
        """The node's vLLM processes once its pool is full: the pool's size and, when it has
        any, the spares (``WorkerPool``), as the node reads its settings."""
        from sllm.settings import NodeSettings

        node = NodeSettings.from_env(self.node_env)
        return node.vllm_pool_size + (node.vllm_spare if node.vllm_pool_size else 0)

    def restart_node(self, *, ssd: bool) -> None:
        """Cold tiers: the DRAM tier removed (and the SSD cache unless ``ssd``), page cache
        dropped."""
        self.stop_node()
        shutil.rmtree(self.dram_root(), ignore_errors=True)
        if not ssd:
            shutil.rmtree(self.root / "cache" / "ssd", ignore_errors=True)
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        self.start_node()

    def deploy(self, name: str, key: str, backend: str, memory: str) -> None:
        spec = {"name": name, "model": name, "backend": backend, "auth": "public",
                "resources": {"memory": memory}, "scale": {"max": 1, "keep_alive": "3600s"},
                "generation": {"max_tokens": 256, "temperature": 0.0}}  # fmt: skip
        body = {"spec": spec, "checkpoint": key, "checkpoint_bytes": 1}
        r = httpx.post(f"{self.url}/system/functions", json=body, headers=AUTH, timeout=30)
        assert r.status_code in (200, 201), r.text

    def scale_to_zero(self, name: str) -> None:
        httpx.post(f"{self.url}/system/scale/{name}", json={"replicas": 0}, headers=AUTH,
                   timeout=30)  # fmt: skip
        deadline = time.monotonic() + 300
        while True:
            fn = httpx.get(f"{self.url}/system/functions/{name}", headers=AUTH, timeout=10).json()
            if not fn.get("instances"):
                return
            assert time.monotonic() < deadline, f"{name} did not scale to zero"
            time.sleep(0.5)

    def close(self) -> None:
        from sllm_cli.servers import stop_process

        self.stop_node()
        stop_process(self.gateway, 30)
        self.nats.stop()
        shutil.rmtree(self.dram_root(), ignore_errors=True)


def deploy_models(plat: Platform, hf: dict[str, Path]) -> None:
    """Both models converted (once), pushed to the store and deployed: ``NAME-vllm`` and
    ``NAME-tf``, one per backend."""
    from runtime.ckpt.convert import convert_checkpoint
    from runtime.store.local import LocalStore
    from runtime.store.push import push_checkpoint

    for name in MODELS:
        ckpt = DATA / f"ckpt-{name}"
        if not ckpt.exists():
            convert_checkpoint(hf[name], ckpt)
        key = f"checkpoints/{name}/bench"
        push_checkpoint(ckpt, LocalStore(plat.store), key)
        memory = "4Gi" if name == "llama1b" else "2Gi"
        plat.deploy(f"{name}-vllm", key, "vllm", memory)
        plat.deploy(f"{name}-tf", key, "transformers", memory)
