"""sllm's load format against the locked vLLM: the entry point vLLM reads, the registry it
lands in, and the loader contract it implements. Run in a fresh interpreter, as vLLM runs its
plugins: importing vLLM here would leave its process-wide settings in the test process."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

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


FIRST_BUILD = """
import json, sys
from pathlib import Path
import torch
from runtime.backend.vllm_process import pool_warm_up
pool_warm_up()
from runtime.backend.vllm_build import (
    VllmOptions, engine_args, engine_plan, preload_engine_tokenizer, prebuild)
from runtime.ckpt.index import image_layout, read_index
from runtime.instance.premap import map_entry
from runtime.loader.model import load_tokenizer
import vllm.logger

entry = Path(sys.argv[1])
index = read_index(entry)
starts, size = image_layout(index)
with open(entry / "image.bin", "wb") as f:  # the DRAM tier's image of the checkpoint
    f.truncate(size)
    for start, part in zip(starts, index.partitions):
        f.seek(start)
        f.write((entry / part.file).read_bytes())
options = VllmOptions(on_cpu=True, memory_bytes=256 << 20, threads=2)
# what an idle process has done when a load comes: the entry mapped, both tokenizers loaded
mapped, tokenizer = map_entry(entry, fill=True), load_tokenizer(entry)
preload_engine_tokenizer(entry)
before = set(sys.modules)
configured = str(vllm.logger._last_configured_logging_config)  # by the warm-up, if at all
warm = prebuild(entry, mapped, tokenizer, options)
print(json.dumps({
    "serving": warm.backend.call(lambda engine: torch.get_num_threads()),
    "setter_replaced": torch.set_num_threads is not torch._C.set_num_threads,
    "imported_by_build": sorted(set(sys.modules) - before),
    "logging": [
        configured,
        str(engine_args(entry, options, engine_plan(entry, index, options))
            .create_logging_config()),
    ],
}))
"""


@pytest.fixture(scope="module")
def first_build(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A CPU engine built in a fresh process after the idle process's warm-up, as a spare
    builds it (``runtime/instance/worker.py``)."""
    from runtime.ckpt.convert import convert_checkpoint
    from tests.tiny_model import VLLM_TINY, build_tiny_llama

    root = tmp_path_factory.mktemp("first-build")
    convert_checkpoint(build_tiny_llama(root / "hf", config=VLLM_TINY), root / "ckpt")
    found: dict[str, Any] = json.loads(_last_line(FIRST_BUILD, str(root / "ckpt")))
    return found


def test_a_cpu_engine_builds_and_serves_on_the_nodes_share_of_the_cores(
    first_build: dict[str, Any],
) -> None:
    """The engine's thread builds and serves with the node's share of the cores (2 here),
    although vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op during the
    build (checked too: the reason sllm keeps torch's own setter)."""
    assert first_build["serving"] == 2
    assert first_build["setter_replaced"]


def test_a_first_build_after_the_warm_up_imports_nothing_and_keeps_the_logging(
    first_build: dict[str, Any],
) -> None:
    """The idle process imported every module the locked vLLM's build imports on first use
    (``_BUILD_MODULES``: about 155 modules; with the logging, 0.21 s of the 1.1B's first
    build and 0.38 s of SmolLM2's here, bench/RESULTS.md) and applied the logging
    configuration the build asks for, so the build skips its ``dictConfig``. A vLLM bump that
    adds a lazy import or changes the default configuration fails here, naming it."""
    assert first_build["imported_by_build"] == [], first_build["imported_by_build"]
    configured, asked = first_build["logging"]
    assert configured == asked
