"""Building a vLLM backend in the instance process from a DRAM entry.

The engine's model is the DRAM entry directory (its ``config.json``, tokenizer files and
generation config are kept verbatim beside the tensors); its weights come through the
``sllm_dram`` load format (``runtime.backend.vllm_loader``). Settings:

- dtype: the checkpoint's own (vLLM's ``auto`` would turn a float32 checkpoint into bfloat16);
- eager on CPU (torch.compile costs minutes here and gains nothing measurable); on CUDA vLLM
  compiles and captures CUDA graphs, its caches under the node's cache directory
  (``compile_cache_env``) so the next start of the same model does not compile again;
- KV cache: the function's ``resources.memory`` less the weights (``kv_cache_bytes``);
- the batch: vLLM's own limits (``max_num_seqs``, and the KV cache the budget leaves; the
  transformers engine's batch limit of 16 would halve throughput at 32 streams); prefix
  caching on (live migration's rounds rely on it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from runtime.backend.choice import ModelFacts
from runtime.ckpt.index import DTYPE_SIZES, CheckpointIndex
from sllm.errors import ValidationFailed

if TYPE_CHECKING:
    from runtime.backend.vllm_engine import VllmBackend
    from runtime.instance.premap import MappedImage

log = logging.getLogger(__name__)

# torch's own setter, taken before any engine is built: vLLM's CPU worker replaces
# torch.set_num_threads with a no-op during a process's first build
_set_torch_threads = torch.set_num_threads

# The least KV cache worth starting an engine with: 64 MiB holds a few thousand tokens of a
# small model; a smaller budget means resources.memory is set below the model's own size.
MIN_KV_CACHE_BYTES = 64 << 20
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class VllmOptions:
    """What the node decides for one vLLM instance."""

    on_cpu: bool
    memory_bytes: int  # the function's resources.memory: weights + KV cache
    cache_dir: str = ""  # the node's cache directory (compile caches on CUDA)
    task: str = "generate"  # "embed": an embedding function's engine (vLLM's pooling runner)
    # CPU: the node's share of the cores for the instance's slot (``LoadSpec.threads``): the
    # engine's torch threads, for its build and its serving; 0: one
    threads: int = 0


def checkpoint_dtype(index: CheckpointIndex) -> str:
    """The floating dtype holding most of the checkpoint's bytes."""
    sizes: Counter[str] = Counter()
    for entry in index.tensors.values():
        if entry.dtype in _FLOAT_DTYPES:
            sizes[entry.dtype] += entry.nbytes
    return sizes.most_common(1)[0][0] if sizes else "float32"


def kv_cache_bytes(memory_bytes: int, weight_bytes: int) -> int:
    """The KV cache an instance gets: its memory budget less its weights. ValidationFailed
    when that leaves less than ``MIN_KV_CACHE_BYTES``."""
    kv = memory_bytes - weight_bytes
    if kv < MIN_KV_CACHE_BYTES:
        raise ValidationFailed(
            f"resources.memory: {memory_bytes / 2**20:.0f} MiB leaves "
            f"{max(kv, 0) / 2**20:.0f} MiB for the KV cache after "
            f"{weight_bytes / 2**20:.0f} MiB of weights; the vLLM backend needs at least "
            f"{MIN_KV_CACHE_BYTES >> 20} MiB (raise resources.memory)"
        )
    return kv


def compile_cache_env(cache_dir: str) -> dict[str, str]:
    """Environment that keeps vLLM's torch.compile and CUDA-graph caches under the node's
    cache directory (CUDA nodes: a second start of the same model reuses them)."""
    if not cache_dir:
        return {}
    return {"VLLM_CACHE_ROOT": str(Path(cache_dir) / "vllm")}


def eos_ids(entry: Path, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        try:
            value = json.loads((entry / name).read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value if isinstance(v, int))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


@dataclass(frozen=True)
class EnginePlan:
    """What an engine for one DRAM entry is built with. ``key`` names the model configuration
    and settings: two entries with the same key differ only in their weights, so an engine
    built for one can take the other's weights in place."""

    dtype: str
    kv_bytes: int
    key: str


# The entry's files that are not weights: the model's configuration, tokenizer and templates.
_CONFIG_SUFFIXES = (".json", ".jinja", ".txt", ".model")
_NOT_CONFIG = {"index.json"}  # the tensor index: it names the weights' checksums


def engine_plan(entry: Path, index: CheckpointIndex, options: VllmOptions) -> EnginePlan:
    dtype = checkpoint_dtype(index)
    # the weights as the engine holds them (tensors of other dtypes are converted)
    weights = sum(
        e.nbytes // DTYPE_SIZES[e.dtype] * DTYPE_SIZES[dtype] for e in index.tensors.values()
    )
    kv = kv_cache_bytes(options.memory_bytes, weights)
    digest = hashlib.sha256(json.dumps([dtype, kv, asdict(options)]).encode())
    for path in sorted(Path(entry).iterdir()):
        if path.suffix in _CONFIG_SUFFIXES and path.name not in _NOT_CONFIG and path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return EnginePlan(dtype, kv, digest.hexdigest()[:16])


@dataclass
class WarmEngine:
    """An engine an idle vLLM process built ahead of need (the node's ``prebuild`` hint) for
    ``entry``: a load with the same plan key takes it as it is (the same entry) or with the
    new entry's weights replaced in place."""

    entry: str
    key: str
    backend: VllmBackend


def open_vllm(
    entry: Path,
    mapped: MappedImage,
    tokenizer: Any,
    options: VllmOptions,
    warm: WarmEngine | None = None,
) -> tuple[VllmBackend, str]:
    """A started engine for the DRAM entry ``entry`` (whose image ``mapped`` this process
    mapped) and how it was had: "kept" (``warm`` was built for this entry), "reloaded"
    (``warm`` was built for the same configuration: weights replaced in place) or "built".
    ``tokenizer``: the model's (transformers), which renders text as on the transformers
    backend. Blocking, seconds for a build, tenths for a reload."""
    from runtime.backend.vllm_loader import offer_image, reload_into

    plan = engine_plan(entry, mapped.index, options)
    # the instance keeps ``mapped`` (and the node the entry) while it serves: bind to it
    offer_image(mapped, bind=True)
    if warm is not None and warm.key == plan.key:
        if warm.entry == str(entry):
            return warm.backend, "kept"
        warm.backend.call(lambda engine: reload_into(engine, entry))
        return warm.backend, "reloaded"
    if warm is not None:  # another configuration: free its memory before building
        warm.backend.close("replaced by an engine for another model", thorough=False)
    return _build(entry, tokenizer, options, plan), "built"


def prebuild(entry: Path, mapped: MappedImage, tokenizer: Any, options: VllmOptions) -> WarmEngine:
    """An engine for ``entry`` built now, to be taken by a later load (``open_vllm``)."""
    from runtime.backend.vllm_loader import offer_image

    plan = engine_plan(entry, mapped.index, options)
    # an idle process pins no entry: the image may be recycled under a waiting engine, so the
    # engine gets its own copy of the weights
    offer_image(mapped, bind=False)
    return WarmEngine(str(entry), plan.key, _build(entry, tokenizer, options, plan))


def _model_args(entry: Path, task: str) -> dict[str, Any]:
    """The ``EngineArgs`` that say which model and tokenizer an engine for ``entry`` runs
    (those its model configuration, and vLLM's tokenizer cache key, come from)."""
    facts = ModelFacts.read(entry)
    config = json.loads((entry / "config.json").read_text())
    # a config without architectures (older GGUF conversions): the class the choice named
    overrides = {} if config.get("architectures") else {"architectures": list(facts.architectures)}
    # an embedding function: vLLM's pooling runner turns the causal LM into an embedding model
    # (last-token pooling, normalised), with no KV cache kept between requests
    pooling = {"runner": "pooling", "convert": "embed"} if task == "embed" else {}
    return {"model": str(entry), "tokenizer": str(entry), "hf_overrides": overrides, **pooling}


def preload_engine_tokenizer(entry: Path, task: str = "generate") -> Any:
    """vLLM's own tokenizer of ``entry``, loaded into vLLM's tokenizer cache
    (``cached_tokenizer_from_config``, keyed by the tokenizer's path and mode) the way an
    engine build asks for it, so a later build in this process takes it from there: 0.25-0.3
    s of a SmolLM2 build here (measured). An idle vLLM process calls this for each DRAM
    entry it premaps (``runtime.instance.premap.Premapper``)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.tokenizers.registry import cached_tokenizer_from_config

    model_config = EngineArgs(**_model_args(entry, task)).create_model_config()
    return cached_tokenizer_from_config(model_config)


def forget_engine_tokenizers() -> None:
    """Empty vLLM's tokenizer cache (``preload_engine_tokenizer``): an idle process whose
    premapped entries changed keeps only the current ones'."""
    from vllm.tokenizers.registry import cached_get_tokenizer

    cached_get_tokenizer.cache_clear()


def engine_args(entry: Path, options: VllmOptions, plan: EnginePlan) -> Any:
    """vLLM's ``EngineArgs`` for an engine of ``entry`` (see the module doc)."""
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import EngineArgs

    from runtime.backend.vllm_loader import LOAD_FORMAT

    return EngineArgs(
        **_model_args(entry, options.task),
        load_format=LOAD_FORMAT,
        dtype=plan.dtype,
        enforce_eager=options.on_cpu,
        kv_cache_memory_bytes=plan.kv_bytes,
        enable_prefix_caching=True,
        disable_log_stats=True,
        # no free whitespace between the tokens of constrained JSON: a small model can fill its
        # whole max_tokens with it otherwise (compact JSON is the same JSON). vLLM reads this
        # per engine, not per request, and only for the xgrammar and guidance backends.
        structured_outputs_config=StructuredOutputsConfig(
            backend="xgrammar", disable_any_whitespace=True
        ),
    )


def _build(entry: Path, tokenizer: Any, options: VllmOptions, plan: EnginePlan) -> VllmBackend:
    from vllm.v1.engine.llm_engine import LLMEngine

    from runtime.backend.vllm_engine import VllmBackend
    from runtime.backend.vllm_kv import ARENA, KvLease

    os.environ.update(compile_cache_env(options.cache_dir))
    args = engine_args(entry, options, plan)

    lease = KvLease()

    def build() -> Any:  # on the backend's thread
        nonlocal lease
        if not options.on_cpu:
            return LLMEngine.from_engine_args(args)
        # The build (weights packed for oneDNN, vLLM's profile run) and the serving use the
        # node's share of the cores for the slot
        _set_torch_threads(options.threads or 1)
        with ARENA.lending(plan.kv_bytes) as lease:
            return LLMEngine.from_engine_args(args)

    backend = VllmBackend(
        build,
        lambda ids: str(tokenizer.decode(list(ids), skip_special_tokens=True)),
        eos_ids=eos_ids(entry, tokenizer),
    )
    backend.start()
    backend.kv_lease = lease
    log.info(
        "vLLM engine built: dtype=%s kv_cache=%d MiB (%s) max_model_len=%d block_size=%d",
        plan.dtype, plan.kv_bytes >> 20,
        (f"{lease.how} in {lease.seconds:.2f} s"
         if lease.nbytes else "vLLM's own"),
        backend.max_context, backend.block_size,
    )  # fmt: skip
    return backend
