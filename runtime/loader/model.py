"""A transformers model around loaded tensors: built on the ``meta`` device, tensors assigned.

No parameter is randomly initialised and no tensor is copied: ``load_state_dict(assign=True)``
makes each parameter wrap the loader's view (on CPU, a view of the DRAM image; on CUDA, a view
of the device image ``runtime.loader.cuda.image_to_device`` filled). What the
checkpoint does not hold is made here: tied weights (``tie_weights``) and non-persistent buffers
such as the rotary ``inv_freq``, which are computed from the config exactly as transformers'
own initialisation does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

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
    Python work (~0.05 s warm, ~2 s on a model class's first use in a process): an instance
    runs it on a side thread while its tensors are being copied to the device."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_config(checkpoint_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]


def build_model(checkpoint_dir: Path, tensors: dict[str, torch.Tensor]) -> PreTrainedModel:
    """The checkpoint's causal-LM model, in eval mode, its parameters being ``tensors`` (all on
    one device, which the model is then on). Raises ``CheckpointError`` naming missing
    weights."""
    return assign_tensors(build_skeleton(checkpoint_dir), checkpoint_dir, tensors)


def assign_tensors(
    model: Any, checkpoint_dir: Path, tensors: dict[str, torch.Tensor]
) -> PreTrainedModel:
    """Make the parameters of a ``build_skeleton`` model be ``tensors`` (no copies: every
    tensor must already be on the one device the model is to run on), tie weights,
    materialize buffers on that device, load the generation config."""
    from transformers import GenerationConfig

    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        where = ", ".join(sorted(str(d) for d in devices)) or "no tensors"
        raise CheckpointError(f"{checkpoint_dir}: tensors must be on one device ({where})")
    (target,) = devices
    result = model.load_state_dict(tensors, strict=False, assign=True)
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


# Files a checkpoint's tokenizer loads from (any one of them means it has one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(checkpoint_dir: Path) -> Any:
    """The checkpoint's tokenizer (with its chat template) from the copied tokenizer files."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(checkpoint_dir))
    except (ValueError, OSError, KeyError) as exc:
        raise CheckpointError(f"{checkpoint_dir}: cannot load the tokenizer ({exc})") from None
