"""sllm's load format for vLLM: the weights come from the node's DRAM tier.

vLLM builds the model (its own classes, its own parameter layout) and asks the load format for
the weights. ``SllmDramLoader`` maps the DRAM entry's image read-only (shared memory the node's
cache holds; one the instance process already mapped while it waited is reused) and hands the
checkpoint's tensors to the model's ``load_weights`` as zero-copy views. vLLM's weight loaders
copy each view into its parameter (fusing q/k/v, gate/up as its layout needs): one memory copy,
no read of any file.

Registered with vLLM's model-loader registry (``register_model_loader``) by ``register``, which
vLLM calls through its general-plugin entry point (``vllm.general_plugins`` in
pyproject.toml) in every process it starts: no patch to vLLM, no copy of its code. An engine
picks it with ``load_format="sllm_dram"`` and the DRAM entry directory as its model.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sllm.errors import CheckpointError

if TYPE_CHECKING:
    from runtime.instance.premap import MappedImage

log = logging.getLogger(__name__)

LOAD_FORMAT = "sllm_dram"

_lock = threading.Lock()
_offered: dict[str, MappedImage] = {}  # entry dir -> image this process mapped already
_registered = False


def offer_image(mapped: MappedImage) -> None:
    """Let the loader use an image this process mapped (and populated) ahead of the load,
    instead of mapping the entry again."""
    with _lock:
        _offered[str(Path(mapped.entry).resolve())] = mapped


def take_image(entry: Path) -> MappedImage:
    """The mapped image of the DRAM entry ``entry``: the one offered, else a new mapping."""
    from runtime.instance.premap import map_entry

    with _lock:
        offered = _offered.pop(str(Path(entry).resolve()), None)
    return offered if offered is not None else map_entry(Path(entry), fill=True)


def load_into(model: Any, entry: Path) -> int:
    """Feed the entry's tensors to a vLLM model's ``load_weights``; returns the bytes fed.

    CheckpointError names parameters the checkpoint did not fill."""
    from runtime.loader.cpu import tensor_views

    mapped = take_image(entry)
    tensors = tensor_views(mapped.index, mapped.image)
    loaded = model.load_weights(iter(tensors.items()))
    if loaded is not None:
        missing = sorted({name for name, _ in model.named_parameters()} - set(loaded))
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise CheckpointError(
                f"{entry}: checkpoint lacks {len(missing)} weight(s) the vLLM model needs: {shown}"
            )
    return sum(t.numel() * t.element_size() for t in tensors.values())


def reload_into(engine: Any, entry: Path) -> None:
    """Replace a built engine's weights in place with the DRAM entry's (same model
    configuration): vLLM's ``reload_weights`` fed the image's views, then its prefix cache
    dropped (KV blocks computed with the old weights must not be reused). Run on the thread
    that owns the engine."""
    from runtime.loader.cpu import tensor_views

    mapped = take_image(entry)
    tensors = tensor_views(mapped.index, mapped.image)
    engine.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(tensors.items())})
    if not engine.reset_prefix_cache():
        raise CheckpointError(f"{entry}: vLLM kept cached KV blocks after a weight reload")


def register() -> None:
    """vLLM's general-plugin hook: register the ``sllm_dram`` load format (idempotent)."""
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    class SllmDramLoader(BaseModelLoader):  # type: ignore[misc]  # vLLM is not type-followed
        """Weights from the sllm DRAM entry named by the model config's ``model``."""

        def download_model(self, model_config: Any) -> None:
            """Nothing to download: the node's tiers brought the checkpoint to DRAM."""

        def load_weights(self, model: Any, model_config: Any) -> None:
            nbytes = load_into(model, Path(model_config.model))
            log.info("loaded %d bytes of weights from the DRAM entry", nbytes)

    register_model_loader(LOAD_FORMAT)(SllmDramLoader)
