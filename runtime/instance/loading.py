"""Bringing a model up inside an instance process: select the device, map the DRAM image, build
the model from zero-copy views of it (on CUDA, views of the device image the pipelined copy
filled: ``runtime.loader.cuda``), load the tokenizer, set up the handler and, on CUDA, run a
warm-up forward pass. Also the pool warm-up a pre-started process runs before any model is
assigned, so the first real load does not pay for first-use costs of torch and transformers.
"""

from __future__ import annotations

import json
import logging
import queue
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.backend.base import Backend
from runtime.backend.transformers import TransformersBackend
from runtime.engine.prompts import Tokenizing
from runtime.engine.request import ErrorEvent, Event, FinishEvent, RequestState
from runtime.engine.sampling import SamplingDefaults, SamplingParams
from runtime.instance.handlers import (
    BUILTIN,
    HandlerContext,
    load_custom_handler,
    write_handler_source,
)
from runtime.instance.load_spec import LoadSpec
from runtime.instance.premap import MappedImage, map_entry, populate
from runtime.instance.server import InstanceService
from sllm.errors import SllmError

log = logging.getLogger(__name__)


def torch_device(device: str) -> str:
    """Node device names ("cpu:0", "cuda:1") to torch's ("cpu", "cuda:1")."""
    return "cpu" if device.startswith("cpu") else device


def _wait(engine: Backend, state: RequestState) -> None:
    events: queue.Queue[Event] = queue.Queue()
    engine.submit(state, events.put)
    while True:
        event = events.get(timeout=120)
        if isinstance(event, ErrorEvent):
            raise SllmError(f"warm-up generation failed: {event.message}")
        if isinstance(event, FinishEvent):
            return


def warm_up(engine: Backend, token_id: int = 0) -> None:
    """A two-token greedy generation through the engine: one prefill and one batched decoding
    step (exercises every code path a request takes)."""
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    _wait(engine, RequestState("warm-up", [token_id, token_id], params))


def forward_warm_up(model: Any, token_id: int = 0) -> None:
    """One forward pass of one token over the real model, on CUDA (see ``load_instance``).
    The engine's code paths were already exercised by ``pool_warm_up``."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        model(input_ids=torch.tensor([[token_id]], device=device), use_cache=False)


def eos_ids_of(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def pool_warm_up() -> None:
    """Import torch and transformers and exercise a tiny Llama end to end (~2-4 s here), so
    a pre-started process has paid every first-use cost before it gets a model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    # Any: some transformers releases leave the model constructors unannotated
    model_class: Any = LlamaForCausalLM
    with torch.device("meta"):
        model_class(config)
    model: Any = model_class(config)
    model.eval()
    engine = TransformersBackend(model, lambda ids: "", eos_ids=[], max_batch=2)
    engine.start()
    try:
        warm_up(engine)
    finally:
        engine.stop()


@dataclass
class LoadedInstance:
    service: InstanceService
    timings: dict[str, float]
    # the DRAM mapping, kept as long as the model's CPU views of it are used; None on CUDA,
    # where the model's tensors are views of the device image and the mapping is closed
    mapped: MappedImage | None
    engine: str = "built"  # vLLM: "kept" / "reloaded" when a warm engine was taken


def load_instance(
    spec: LoadSpec, premapped: MappedImage | None = None, warm: Any = None
) -> LoadedInstance:
    """Build the model from the DRAM entry and everything around it (blocking, seconds).
    ``premapped``: the entry's image already mapped by this process while it waited; ``warm``:
    a vLLM engine it built ahead of need (``runtime.backend.vllm_build.WarmEngine``).

    On CUDA the device is selected first, before anything else touches CUDA, so this process
    opens its one context on ``spec.device``. The meta skeleton of the model is built on a
    side thread while the tensors are made (CPU: views of the mapping; CUDA: the pipelined
    copy), then the tensors are assigned to it, never copied again. vLLM builds its own model
    inside its engine, from the mapping through the ``sllm_dram`` load format."""
    import torch

    from runtime.loader.cpu import tensor_views
    from runtime.loader.model import assign_tensors, build_skeleton, load_tokenizer

    if spec.threads > 0:
        torch.set_num_threads(spec.threads)
    device = torch_device(spec.device)
    on_cpu = device == "cpu"
    if not on_cpu:
        from runtime.loader.cuda import select_device

        device = str(select_device(device))
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    entry = Path(spec.entry_dir)
    vllm = spec.backend == "vllm"
    # built over the mapping by the idle process (``runtime.instance.premap``), else now
    prebuilt = premapped.model if premapped is not None and on_cpu and not vllm else None
    timings["model_prebuilt"] = float(prebuilt is not None)
    with ThreadPoolExecutor(1, thread_name_prefix="sllm-skeleton") as pool:
        skeleton = None if vllm or prebuilt is not None else pool.submit(build_skeleton, entry)
        mapped = premapped or map_entry(entry, fill=on_cpu)
        kept: MappedImage | None = mapped
        tensors: dict[str, Any] = {}
        if on_cpu:
            if not mapped.populated:
                mapped.populated = populate(mapped.mapping)
            if skeleton is not None:
                tensors = tensor_views(mapped.index, mapped.image)
        elif not vllm:  # vLLM copies the weights to its device through the sllm_dram loader
            from runtime.loader.cuda import image_to_device

            placed = image_to_device(mapped.index, mapped.image, device)
            tensors = placed.tensors
            timings["copy_s"] = placed.stats.seconds
            timings["pinned_bytes"] = float(placed.stats.pinned_bytes)
            mapped.close()
            kept = None
        timings["map_s"] = time.monotonic() - t0

        t1 = time.monotonic()
        model: Any = prebuilt
        if skeleton is not None:
            model = assign_tensors(skeleton.result(), entry, tensors)
    t_tok = time.monotonic()
    # loaded while the process waited (``runtime.instance.premap``), else now
    tokenizer = premapped.tokenizer if premapped is not None else None
    timings["tokenizer_preloaded"] = float(tokenizer is not None)
    if tokenizer is None:
        tokenizer = load_tokenizer(entry)
    timings["tokenizer_s"] = time.monotonic() - t_tok
    tok = Tokenizing(tokenizer)
    engine: Backend
    how = "built"
    if model is None:
        from runtime.backend.vllm_build import open_vllm
        from runtime.backend.vllm_loader import load_report

        engine, how = open_vllm(entry, mapped, tokenizer, vllm_options(spec), warm)
        report = load_report(entry)
        if report is not None:  # an engine built: its weights bound to the image, or copied
            timings["weights_bound_bytes"], timings["weights_copied_bytes"] = map(float, report)
        lease = engine.kv_lease
        if how == "built" and lease is not None and lease.nbytes:
            # within build_s: the KV cache taken from the process's arena (zeroed) or allocated
            timings[lease.timing_key] = lease.seconds
    else:
        eos = eos_ids_of(model, tokenizer)
        engine = TransformersBackend(model, tok.decode, eos_ids=eos, max_batch=spec.max_batch)
        engine.start()
    timings["build_s"] = time.monotonic() - t1

    t2 = time.monotonic()
    defaults = _defaults(spec.generation)
    context = HandlerContext(
        engine, tok, defaults, dict(spec.env), model=model, tokenizer=tokenizer
    )
    custom = None
    if spec.handler not in BUILTIN:
        # never inside the DRAM entry: that directory is the cache's, shared by every function
        # using this checkpoint
        handler_dir = Path(spec.handler_dir or tempfile.mkdtemp(prefix="sllm-handler-"))
        write_handler_source(handler_dir, spec.handler_source)
        custom, context.state = load_custom_handler(
            spec.handler, handler_dir, model, tokenizer, dict(spec.env)
        )
    timings["handler_s"] = time.monotonic() - t2

    # On a device the first pass creates its cuBLAS handles and loads kernels: paid here, not by
    # the first request. On CPU a transformers model has nothing of that kind left after the pool
    # warm-up and the premapped (populated) image: measured on the 2.15 GB float32 bench model,
    # passes 1 to 4 each took 0.4-1.1 s (load average 8-10), the first no slower, with no page
    # fault and 92 % in aten::mm, i.e. a pass is one read of every weight, which would only make
    # ``ready`` wait for the read the first request does. Neither has vLLM's CPU engine: its
    # two-token warm-up took 0.080 s after a SmolLM2 build and the first request's first token
    # then came 0.069 s later, against 0.078-0.081 s with no warm-up (one-off, three runs each):
    # 0.07 s of every vLLM cold start on CPU for 0.01 s of the first request.
    bos = getattr(tokenizer, "bos_token_id", None)
    token = int(bos) if isinstance(bos, int) else 0
    if not on_cpu:
        t3 = time.monotonic()
        if model is not None:
            forward_warm_up(model, token)
        elif spec.handler == "embedding":
            engine.embed([[token, token]])
        else:  # one prefill and one decoding step through the engine
            warm_up(engine, token)
        timings["warm_up_s"] = time.monotonic() - t3
    service = InstanceService(
        function=spec.function,
        instance_id=spec.instance_id,
        handler=spec.handler,
        engine=engine,
        tok=tok,
        defaults=defaults,
        context=context,
        custom=custom,
    )
    log.info("instance %s loaded (engine %s): %s", spec.instance_id, how, json.dumps(timings))
    return LoadedInstance(service, timings, kept, how)


def vllm_options(spec: LoadSpec) -> Any:
    from runtime.backend.vllm_build import VllmOptions

    on_cpu = spec.device.startswith("cpu")
    task = "embed" if spec.handler == "embedding" else "generate"
    return VllmOptions(on_cpu, spec.memory_bytes, spec.cache_dir, task, spec.threads)


def prebuild_vllm(spec: LoadSpec, premapped: MappedImage | None) -> Any:
    """A warm vLLM engine for ``spec``'s entry (``runtime.backend.vllm_build.prebuild``)."""
    from runtime.backend.vllm_build import prebuild
    from runtime.loader.model import load_tokenizer

    entry = Path(spec.entry_dir)
    mapped = premapped or map_entry(entry, fill=True)
    tokenizer = mapped.tokenizer if mapped.tokenizer is not None else load_tokenizer(entry)
    return prebuild(entry, mapped, tokenizer, vllm_options(spec))


def _defaults(generation: dict[str, Any]) -> SamplingDefaults:
    return SamplingDefaults(
        max_tokens=int(generation.get("max_tokens", 256)),
        temperature=float(generation.get("temperature", 0.7)),
        top_p=float(generation.get("top_p", 1.0)),
    )
