"""sllm's load format against the locked vLLM: the entry point vLLM reads, the registry it
lands in, and the loader contract it implements. Run in a fresh interpreter, as vLLM runs its
plugins: importing vLLM here would leave its process-wide settings in the test process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def _last_line(code: str, *args: str) -> str:
    """The last line ``code`` prints, run in a fresh interpreter with vLLM's offline settings."""
    run = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip().splitlines()[-1]


PROBE = """
import importlib.metadata, inspect, json
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader import get_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_general_plugins

points = {e.name: e.value for e in importlib.metadata.entry_points(group=DEFAULT_PLUGINS_GROUP)}
load_general_plugins()  # what every vLLM process does at start
loader = get_model_loader(LoadConfig(load_format="sllm_dram"))
print(json.dumps({
    "group": DEFAULT_PLUGINS_GROUP,
    "entry_point": points.get("sllm_dram_loader"),
    "loader": type(loader).__name__,
    "is_base_loader": isinstance(loader, BaseModelLoader),
    "abstract": sorted(BaseModelLoader.__abstractmethods__),
    "load_weights": list(inspect.signature(BaseModelLoader.load_weights).parameters),
}))
"""


def test_load_format_registers_through_the_general_plugin_entry_point() -> None:
    found = json.loads(_last_line(PROBE))
    assert found["group"] == "vllm.general_plugins"
    assert found["entry_point"] == "runtime.backend.vllm_loader:register"
    assert found["loader"] == "SllmDramLoader" and found["is_base_loader"]
    # the two methods sllm's loader implements are all vLLM requires of a loader, with the
    # arguments it passes: a new abstract method or signature breaks the load format
    assert found["abstract"] == ["download_model", "load_weights"]
    assert found["load_weights"] == ["self", "model", "model_config"]


DEPLOY_CHECK = """
import sys
from pathlib import Path
from sllm_cli.deploy import check_backend
from sllm.errors import ValidationFailed
from sllm.spec import FunctionSpec

spec = FunctionSpec(name="f", model="m", backend="vllm")
try:
    check_backend(spec, Path(sys.argv[1]))
except ValidationFailed as exc:
    print("refused:", exc.message)
else:
    print("accepted")
"""


def test_deploy_refuses_backend_vllm_for_a_model_vllm_cannot_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """`sllm fn deploy`'s check, before any upload: head size 16 has no CPU attention kernel."""
    from runtime.ckpt.convert import convert_checkpoint
    from tests.tiny_model import TinyConfig, build_tiny_llama

    root = tmp_path_factory.mktemp("deploy-check")
    convert_checkpoint(build_tiny_llama(root / "hf", config=TinyConfig()), root / "ckpt")
    verdict = _last_line(DEPLOY_CHECK, str(root / "ckpt"))
    assert verdict.startswith("refused: backend: vllm: vLLM ")
    assert "no kernel for head size 16" in verdict
    assert "backend: auto would serve it with transformers" in verdict


WARM_UP = """
import gc, json, sys
from runtime.backend.vllm_process import _WORKER_MODULES, pool_warm_up
from vllm.platforms import current_platform
support = pool_warm_up()
print(json.dumps({
    "worker": _WORKER_MODULES[str(current_platform.device_type)],
    "imported": sorted(m for m in _WORKER_MODULES.values() if m in sys.modules),
    "frozen": gc.get_freeze_count(),
    "llama": "LlamaForCausalLM" in support["architectures"],
}))
"""


def test_an_idle_vllm_process_imports_its_worker_and_freezes_the_heap() -> None:
    """What a pool process does before any load: the worker module the locked vLLM resolves
    for this platform is imported (a module renamed by a vLLM bump would leave it to the
    first build, 1.0-1.3 s of it), and the post-import heap is frozen for the build's five
    ``gc.collect`` calls."""
    found = json.loads(_last_line(WARM_UP))
    assert found["worker"] in found["imported"]
    assert found["frozen"] > 100_000
    assert found["llama"]


ENGINE_TOKENIZER = """
import json, sys
from pathlib import Path
from runtime.backend.vllm_build import (
    VllmOptions, engine_args, engine_plan, forget_engine_tokenizers, preload_engine_tokenizer)
from runtime.ckpt.index import read_index
from vllm.tokenizers.registry import cached_get_tokenizer, cached_tokenizer_from_config

entry = Path(sys.argv[1])
preloaded = preload_engine_tokenizer(entry)
before = cached_get_tokenizer.cache_info()
# the model configuration a real build makes, and the call its engine makes with it
options = VllmOptions(on_cpu=True, memory_bytes=256 << 20)
config = engine_args(entry, options, engine_plan(entry, read_index(entry), options))
asked = cached_tokenizer_from_config(config.create_model_config())
after = cached_get_tokenizer.cache_info()
forget_engine_tokenizers()
print(json.dumps({
    "same": asked is preloaded, "hits": after.hits - before.hits,
    "misses": after.misses - before.misses,
    "left": cached_get_tokenizer.cache_info().currsize,
}))
"""


def test_an_engine_build_takes_the_tokenizer_an_idle_process_preloaded(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """An idle vLLM process loads vLLM's tokenizer of each DRAM entry into vLLM's cache
    (0.25-0.3 s of a build here). This pins the cache key against the locked vLLM: the
    engine of a real build asks with its own model configuration and gets the same object,
    a hit, not a second load."""
    from runtime.ckpt.convert import convert_checkpoint
    from tests.tiny_model import VLLM_TINY, build_tiny_llama

    root = tmp_path_factory.mktemp("engine-tokenizer")
    convert_checkpoint(build_tiny_llama(root / "hf", config=VLLM_TINY), root / "ckpt")
    found = json.loads(_last_line(ENGINE_TOKENIZER, str(root / "ckpt")))
    assert found == {"same": True, "hits": 1, "misses": 0, "left": 0}


SERVING_THREADS = """
import json, sys
from pathlib import Path
import torch
from runtime.backend.vllm_process import pool_warm_up
pool_warm_up()
from runtime.backend.vllm_build import VllmOptions, prebuild
from runtime.ckpt.index import image_layout, read_index
from runtime.instance.premap import map_entry
from runtime.loader.model import load_tokenizer

entry = Path(sys.argv[1])
index = read_index(entry)
starts, size = image_layout(index)
with open(entry / "image.bin", "wb") as f:  # the DRAM tier's image of the checkpoint
    f.truncate(size)
    for start, part in zip(starts, index.partitions):
        f.seek(start)
        f.write((entry / part.file).read_bytes())
options = VllmOptions(on_cpu=True, memory_bytes=256 << 20, threads=2)
warm = prebuild(entry, map_entry(entry, fill=True), load_tokenizer(entry), options)
print(json.dumps({
    "serving": warm.backend.call(lambda engine: torch.get_num_threads()),
    "setter_replaced": torch.set_num_threads is not torch._C.set_num_threads,
}))
"""


def test_a_cpu_engine_builds_and_serves_on_the_nodes_share_of_the_cores(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The engine's thread builds and serves with the node's share of the cores (2 here),
    although vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op during the
    build (checked too: the reason sllm keeps torch's own setter)."""
    from runtime.ckpt.convert import convert_checkpoint
    from tests.tiny_model import VLLM_TINY, build_tiny_llama

    root = tmp_path_factory.mktemp("serving-threads")
    convert_checkpoint(build_tiny_llama(root / "hf", config=VLLM_TINY), root / "ckpt")
    found = json.loads(_last_line(SERVING_THREADS, str(root / "ckpt")))
    assert found == {"serving": 2, "setter_replaced": True}
