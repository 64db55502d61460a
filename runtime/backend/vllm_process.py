"""A vLLM instance process before it has a model, and whether a node offers vLLM at all.

``prepare_environment`` runs first in a process that will host a vLLM engine: the engine core
runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no engine-core or worker process),
and nothing reaches for the network (no usage statistics, no model hub). ``pool_warm_up``
then imports vLLM and what an engine build needs, so a load pays only for the engine itself;
it returns what this vLLM supports, which the process reports in its idle line and the node
uses to choose backends (``runtime.backend.choice``).
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import logging
import os
from typing import Any

from sllm.errors import ValidationFailed

log = logging.getLogger(__name__)

# setdefault: an operator's own value wins
_ENVIRONMENT = {
    # one process: the engine core is called in-process instead of over ZMQ from another
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    # vLLM's INFO lines (a dozen per engine build) would each become a NATS log line
    "VLLM_LOGGING_LEVEL": "WARNING",
}


def vllm_unavailable(mode: str) -> str | None:
    """Why this node offers no vLLM backend, or None when it does. ``mode`` is SLLM_VLLM:
    ``off``, ``auto`` (when the ``vllm`` module is installed) or ``on`` (ValidationFailed
    when it is not)."""
    if mode == "off":
        return "the vLLM backend is off on this node (SLLM_VLLM=off)"
    if importlib.util.find_spec("vllm") is None:
        if mode == "on":
            raise ValidationFailed(
                "SLLM_VLLM=on: the vllm module is not installed (extra `vllm`, or `vllm-cuda` "
                "on CUDA nodes)"
            )
        return "vLLM is not installed on this node"
    return None


def prepare_environment() -> None:
    for key, value in _ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def vllm_support() -> dict[str, Any]:
    """What this vLLM can run (``runtime.backend.choice.VllmSupport.to_dict``)."""
    import vllm
    from vllm.model_executor.models.registry import ModelRegistry

    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        head_sizes = sorted(CPUAttentionBackend.get_supported_head_sizes())
    except ImportError:  # a build without the CPU backend (CUDA): only CPU devices ask
        head_sizes = []
    return {
        "version": str(vllm.__version__),
        "architectures": sorted(ModelRegistry.get_supported_archs()),
        "cpu_head_sizes": head_sizes,
    }


# The worker module an engine build imports (vLLM resolves it by name), per platform: 1.0-1.3 s
# of a process's first build here (cProfile), paid by the idle process instead.
_WORKER_MODULES = {"cpu": "vllm.v1.worker.cpu_worker", "cuda": "vllm.v1.worker.gpu_worker"}

# The other modules a process's first build imported (inside vLLM's functions, on first use),
# about 155 of them with what they import: the online-quantization check of the model loader pulls
# in compressed_tensors and loguru; the scheduler and the renderer of HF tokenizers are resolved
# by name; the CPU platform's kernel overrides; sllm's own engine and load-format helpers.
# Imported by the idle process instead (0.06-0.1 s there). A vLLM bump that moves one leaves
# it to the build again: tests/integration/vllm/test_loader_plugin.py names what a build still
# imports. Per platform: "" for all.
_BUILD_MODULES = {
    "": (
        "vllm.model_executor.layers.quantization.online.base",
        "vllm.v1.core.sched.scheduler",
        "vllm.renderers.hf",
        "vllm.distributed.elastic_ep.elastic_execute",
        "vllm.v1.pool.flash_maxsim",
        "runtime.ckpt.convert",
        "runtime.backend.vllm_engine",
        "runtime.backend.vllm_kv",
    ),
    "cpu": ("vllm.triton_utils.dispatcher", "vllm.utils.cpu_triton_utils"),
}


def _import_ahead(names: list[str]) -> None:
    """Import ``names``, each as a build would; one that fails is left to the build, where
    its error belongs (the idle process must come up either way)."""
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # another vLLM layout or platform
            log.info("module %s not imported ahead of a build: %s", name, exc)


def pool_warm_up() -> dict[str, Any]:
    """Import vLLM's engine, the platform's worker and the modules a build imports on first
    use, load vLLM's plugins (sllm's load format among them) and apply the logging
    configuration a build asks for, then freeze what the imports left on the heap; returns
    ``vllm_support()``.

    The freeze: an engine build calls ``gc.collect`` five times, and each walked the whole
    post-import heap (0.2 s each, 1.0 s of a 9.4 s first build here, cProfile); frozen
    objects (modules, classes) are not walked again, and were never garbage."""
    prepare_environment()
    from vllm.config.logging import LoggingConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.logger import configure_logging_if_needed
    from vllm.platforms import current_platform
    from vllm.plugins import load_general_plugins
    from vllm.v1.engine.llm_engine import LLMEngine

    load_general_plugins()
    del EngineArgs, LLMEngine
    platform = str(current_platform.device_type)
    worker = _WORKER_MODULES.get(platform)
    _import_ahead(
        ([worker] if worker else []) + [*_BUILD_MODULES[""], *_BUILD_MODULES.get(platform, ())]
    )
    # A build applies vLLM's logging configuration unless the process already has it: Python's
    # dictConfig over every logger the imports made (0.03 s here, 0.2 s under cProfile).
    # sllm's engine_args set none of it, so a build asks for vLLM's default (pinned by a test).
    configure_logging_if_needed(LoggingConfig())
    support = vllm_support()
    gc.collect()
    gc.freeze()
    return support
