"""A vLLM instance process before it has a model, and whether a node offers vLLM at all.

``prepare_environment`` runs first in a process that will host a vLLM engine: the engine core
runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no engine-core or worker process),
and nothing reaches for the network (no usage statistics, no model hub). ``pool_warm_up``
then imports vLLM and what an engine build needs, so a load pays only for the engine itself;
it returns what this vLLM supports, which the process reports in its idle line and the node
uses to choose backends (``runtime.backend.choice``).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from sllm.errors import ValidationFailed

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


def pool_warm_up() -> dict[str, Any]:
    """Import vLLM's engine and load its plugins (sllm's load format among them); returns
    ``vllm_support()``."""
    prepare_environment()
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins
    from vllm.v1.engine.llm_engine import LLMEngine

    load_general_plugins()
    del EngineArgs, LLMEngine
    return vllm_support()
