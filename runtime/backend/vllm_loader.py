"""sllm's load format for vLLM: the weights come from the node's DRAM tier.

vLLM builds the model (its own classes, its own parameter layout) and asks the load format for
the weights. ``SllmDramLoader`` maps the DRAM entry's image read-only (shared memory the node's
cache holds; one the instance process already mapped while it waited is reused) and hands the
checkpoint's tensors to the model's ``load_weights`` as zero-copy views. vLLM's weight loaders
copy each view into its parameter (fusing q/k/v, gate/up as its layout needs): one memory copy,
no read of any file.

An engine built to serve (not a prebuild, whose image nobody pins) skips even that copy where it
can: ``bind_views`` points a parameter at the image's bytes when the image holds them exactly as
vLLM lays the parameter out (same dtype and shape; a fused parameter's parts adjacent, which
``runtime.ckpt.convert.serving_order`` arranges). Copying 1.8 GB into freshly allocated
parameters is most of a built engine's start on this kind of machine. The node pins the entry
for as long as the instance runs, so the image outlives the engine. Only model classes whose
weight loading of such parameters is a plain copy are bound (``_BINDABLE``); the rest, and every
parameter that does not match, are copied as before.

Registered with vLLM's model-loader registry (``register_model_loader``) by ``register``, which
vLLM calls through its general-plugin entry point (``vllm.general_plugins`` in
pyproject.toml) in every process it starts: no patch to vLLM, no copy of its code. An engine
picks it with ``load_format="sllm_dram"`` and the DRAM entry directory as its model.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sllm.errors import CheckpointError

if TYPE_CHECKING:
    from runtime.instance.premap import MappedImage

log = logging.getLogger(__name__)

LOAD_FORMAT = "sllm_dram"

# vLLM model classes whose weight loaders, for parameters bound by ``bind_views``, only copy
# (LlamaForCausalLM: q/k/v and gate/up stacked, the rest as they are; no permutation or scaling)
_BINDABLE = frozenset({"LlamaForCausalLM"})

_lock = threading.Lock()
# entry dir -> (image this process mapped already, whether parameters may be bound to it)
_offered: dict[str, tuple[MappedImage, bool]] = {}
# entry dir -> (bytes bound, bytes copied) of the latest engine built to serve it
_reports: dict[str, tuple[int, int]] = {}
_registered = False


def offer_image(mapped: MappedImage, *, bind: bool) -> None:
    """Let the loader use an image this process mapped (and populated) ahead of the load,
    instead of mapping the entry again. ``bind``: the caller keeps ``mapped`` (and the node
    the entry) for the engine's life, so parameters may be views of it."""
    with _lock:
        _offered[str(Path(mapped.entry).resolve())] = (mapped, bind)


def take_image(entry: Path) -> tuple[MappedImage, bool]:
    """The mapped image of the DRAM entry ``entry`` and whether parameters may be bound to it:
    the one offered, else a new mapping (not bound: nobody keeps it)."""
    from runtime.instance.premap import map_entry

    with _lock:
        offered = _offered.pop(str(Path(entry).resolve()), None)
    return offered if offered is not None else (map_entry(Path(entry), fill=True), False)


def bind_views(model: Any, tensors: dict[str, Any], image: Any) -> tuple[set[str], set[str]]:
    """Point each CPU parameter of ``model`` whose bytes ``image`` holds as vLLM lays them out
    at those bytes (see the module doc). Returns the parameter names bound and the checkpoint
    tensors they took."""
    from runtime.ckpt.convert import FUSED_PARTS, split_name

    bound: set[str] = set()
    used: set[str] = set()
    if type(model).__name__ not in _BINDABLE:
        return bound, used
    for name, param in model.named_parameters():
        layer, module, leaf = split_name(name)
        fused = FUSED_PARTS.get(module)
        parts = [f"{layer}.{p}.{leaf}" for p in fused] if fused else [name]
        views = [tensors[p] for p in parts if p in tensors]
        if param.device.type != "cpu" or len(views) != len(parts):
            continue
        view = _joined(views, param, image)
        if view is not None:
            param.data = view
            bound.add(name)
            used.update(parts)
    return bound, used


def _joined(views: list[Any], param: Any, image: Any) -> Any:
    """``views`` (adjacent in ``image``) as one tensor shaped like ``param``, else None."""
    if any(v.dtype != param.dtype for v in views):
        return None
    if len(views) == 1:
        return views[0] if views[0].shape == param.shape else None
    if param.dim() == 0 or any(v.shape[1:] != param.shape[1:] for v in views):
        return None
    if sum(v.shape[0] for v in views) != param.shape[0]:
        return None
    for a, b in itertools.pairwise(views):
        if a.data_ptr() + a.nbytes != b.data_ptr():
            return None
    begin = views[0].data_ptr() - image.data_ptr()
    nbytes = sum(v.nbytes for v in views)
    return image[begin : begin + nbytes].view(param.dtype).view(param.shape)


def load_into(model: Any, entry: Path) -> tuple[int, int]:
    """Give a vLLM model the entry's weights: parameters bound to the image where allowed
    (``bind_views``), the other tensors fed to its ``load_weights``. Returns the bytes bound
    and the bytes fed.

    CheckpointError names parameters the checkpoint did not fill."""
    from runtime.loader.cpu import tensor_views

    mapped, bind = take_image(entry)
    tensors = tensor_views(mapped.index, mapped.image)
    bound, used = bind_views(model, tensors, mapped.image) if bind else (set(), set())
    # an alias of a bound tensor (tied embeddings) is not fed: that would write into the image
    taken = {id(tensors[n]) for n in used}
    rest = {n: t for n, t in tensors.items() if id(t) not in taken}
    loaded = model.load_weights(iter(rest.items()))
    if loaded is not None:
        missing = sorted({name for name, _ in model.named_parameters()} - set(loaded) - bound)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise CheckpointError(
                f"{entry}: checkpoint lacks {len(missing)} weight(s) the vLLM model needs: {shown}"
            )
    report = _distinct_bytes(tensors[n] for n in used), _distinct_bytes(rest.values())
    if bind:  # an engine built to serve: its instance reports how its weights came
        with _lock:
            _reports[str(Path(entry).resolve())] = report
    return report


def _distinct_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of ``tensors``, each counted once (an alias is the same tensor object)."""
    return sum({id(t): t.nbytes for t in tensors}.values())


def load_report(entry: Path) -> tuple[int, int] | None:
    """``(bytes bound, bytes copied)`` of the latest engine built in this process to serve
    ``entry`` (taken: None once read, or when none was built)."""
    with _lock:
        return _reports.pop(str(Path(entry).resolve()), None)


def reload_into(engine: Any, entry: Path) -> None:
    """Replace a built engine's weights in place with the DRAM entry's (same model
    configuration): vLLM's ``reload_weights`` fed the image's views, then its prefix cache
    dropped (KV blocks computed with the old weights must not be reused). Run on the thread
    that owns the engine."""
    from runtime.loader.cpu import tensor_views

    mapped, _ = take_image(entry)  # copied into the engine's own parameters: never bound
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
            bound, fed = load_into(model, Path(model_config.model))
            log.info(
                "weights from the DRAM entry: %d bytes bound in place, %d bytes copied", bound, fed
            )

    register_model_loader(LOAD_FORMAT)(SllmDramLoader)
