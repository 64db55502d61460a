"""A transformers model around loaded tensors: built on the ``meta`` device, tensors assigned.

No parameter is randomly initialised and no tensor is copied: ``load_state_dict(assign=True)``
makes each parameter wrap the loader's view (on CPU, a view of the checkpoint image). What the
checkpoint does not hold is made here: tied weights (``tie_weights``) and non-persistent buffers
such as the rotary ``inv_freq``, which are computed from the config exactly as transformers'
own initialisation does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from runtime.loader.cpu import LoadedCheckpoint, load_checkpoint
from sllm.errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


def load_config(checkpoint_dir: Path) -> Any:
    from transformers import AutoConfig

    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint has no model config)")
    try:
        return AutoConfig.from_pretrained(str(checkpoint_dir))
    except (ValueError, OSError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot read the model config ({exc})") from None


def build_skeleton(checkpoint_dir: Path) -> Any:
    """The checkpoint's causal-LM model on the ``meta`` device (no memory, no init). Pure
    Python work: ``load_model`` runs it while the reads of the tensors are under way."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_config(checkpoint_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]


def build_model(
    checkpoint_dir: Path, tensors: dict[str, torch.Tensor], device: str = "cpu"
) -> PreTrainedModel:
    """The checkpoint's causal-LM model, in eval mode, its parameters being ``tensors``.

    Tensors not on ``device`` are moved there (the CUDA loader hands over device tensors, so
    nothing moves then). Raises ``CheckpointError`` naming missing weights.
    """
    return assign_tensors(build_skeleton(checkpoint_dir), checkpoint_dir, tensors, device)


def assign_tensors(
    model: Any, checkpoint_dir: Path, tensors: dict[str, torch.Tensor], device: str = "cpu"
) -> PreTrainedModel:
    """Make the parameters of a ``build_skeleton`` model be ``tensors`` (no copies), tie
    weights, materialize buffers, load the generation config."""
    import torch
    from transformers import GenerationConfig

    target = torch.device(device)
    on_device = {k: v if v.device == target else v.to(target) for k, v in tensors.items()}
    result = model.load_state_dict(on_device, strict=False, assign=True)
    tied = set((getattr(model, "all_tied_weights_keys", None) or {}).keys())
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(
            f"{checkpoint_dir}: checkpoint lacks {len(missing)} weight(s) the model needs: {shown}"
        )
    if result.unexpected_keys:
        log.info("ignoring %d tensors the model does not use", len(result.unexpected_keys))
    model.tie_weights()
    _materialize_buffers(model, target)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise CheckpointError(f"{checkpoint_dir}: weights left unset: {', '.join(leftover[:5])}")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    gen_path = Path(checkpoint_dir) / "generation_config.json"
    if gen_path.is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(checkpoint_dir))
    return cast("PreTrainedModel", model)


def _materialize_buffers(model: Any, device: torch.device) -> None:
    """Give every buffer still on ``meta`` its real value on ``device``.

    Rotary embeddings are recomputed with transformers' own ``_init_weights`` (which, for a
    rotary module, only computes ``inv_freq`` from the config). Other meta buffers would need
    the checkpoint to hold them, so they are an error.
    """
    import torch

    with torch.no_grad():
        for module_name, module in model.named_modules():
            meta = [
                n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta
            ]
            if not meta:
                continue
            if "RotaryEmbedding" not in type(module).__name__:
                where = ", ".join(f"{module_name}.{n}" for n in meta)
                raise CheckpointError(f"cannot materialize buffer(s) {where}: not in checkpoint")
            for name in meta:
                buffer = getattr(module, name)
                module.register_buffer(
                    name,
                    torch.empty_like(buffer, device=device),
                    persistent=name not in module._non_persistent_buffers_set,
                )
            model._init_weights(module)


def load_tokenizer(checkpoint_dir: Path) -> Any:
    """The checkpoint's tokenizer (with its chat template) from the copied tokenizer files."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(checkpoint_dir))
    except (ValueError, OSError, KeyError) as exc:
        raise CheckpointError(f"{checkpoint_dir}: cannot load the tokenizer ({exc})") from None


def load_model(
    checkpoint_dir: Path, device: str = "cpu", *, image: torch.Tensor | None = None
) -> tuple[LoadedCheckpoint, PreTrainedModel]:
    """CPU load + model: the loaded checkpoint (keep it: it owns the image) and the model.

    The meta skeleton is built on a side thread while the reads run (the reads release the
    GIL and wait on the disk; building the skeleton is ~0.1-2 s of Python), so the model is
    ready about when the last byte is.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="sllm-skeleton") as pool:
        skeleton = pool.submit(build_skeleton, checkpoint_dir)
        loaded = load_checkpoint(checkpoint_dir, image=image)
        model = skeleton.result()
    return loaded, assign_tensors(model, checkpoint_dir, loaded.tensors, device)
