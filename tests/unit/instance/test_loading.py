"""``load_instance`` on CPU, in this process: the model from a DRAM entry's views, ready
without a warm-up forward pass (on CPU a pass is one read of every weight and warms nothing
the pool warm-up left cold), and generating through the engine."""

from __future__ import annotations

import queue
import uuid
from pathlib import Path

from runtime.ckpt.convert import convert_checkpoint
from runtime.engine.request import FinishEvent, RequestState, TokenEvent
from runtime.engine.sampling import SamplingParams
from runtime.instance.loading import LoadSpec, load_instance
from tests.loaded import dram_entry


def test_cpu_load_is_ready_without_a_warm_up_pass_and_generates(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    convert_checkpoint(tiny_model_dir, ckpt)
    entry = dram_entry(ckpt, tmp_path / f"dram-{uuid.uuid4().hex[:8]}")
    spec = LoadSpec(
        instance_id="i", function="f", handler="completion", entry_dir=str(entry),
        device="cpu:0", threads=1, secret="s",
    )  # fmt: skip
    loaded = load_instance(spec)
    engine = loaded.service.engine
    try:
        assert "warm_up_s" not in loaded.timings
        assert {"map_s", "build_s", "handler_s"} <= set(loaded.timings)
        events: queue.Queue[object] = queue.Queue()
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        engine.submit(RequestState("r", [1, 5, 9], params), events.put)
        tokens: list[int] = []
        while not isinstance(event := events.get(timeout=60), FinishEvent):
            assert isinstance(event, TokenEvent), event
            tokens.extend(event.token_ids)
        assert len(tokens) == 3
    finally:
        engine.stop()
        if loaded.mapped is not None:
            loaded.mapped.close()


def test_a_load_takes_the_tokenizer_the_idle_process_loaded(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """An idle process's premap loads each entry's tokenizer (transformers' AutoTokenizer took
    0.4-0.5 s for SmolLM2's); the load then uses that object instead of loading it again."""
    from runtime.instance.premap import Premapper
    from runtime.loader.model import TOKENIZER_FILES

    ckpt = tmp_path / "ckpt"
    convert_checkpoint(tiny_model_dir, ckpt)
    entry = str(dram_entry(ckpt, tmp_path / f"dram-{uuid.uuid4().hex[:8]}"))
    bare = str(dram_entry(ckpt, tmp_path / "bare"))  # no tokenizer files: mapped, no tokenizer
    for name in TOKENIZER_FILES:
        (Path(bare) / name).unlink(missing_ok=True)
    premapper = Premapper()
    premapper.update([entry, bare])
    assert premapper.images[bare].tokenizer is None
    preloaded = premapper.images[entry].tokenizer
    assert preloaded is not None and preloaded.encode("hello world")
    spec = LoadSpec(
        instance_id="i", function="f", handler="completion", entry_dir=entry,
        device="cpu:0", threads=1, secret="s",
    )  # fmt: skip
    loaded = load_instance(spec, premapper.take(entry))
    try:
        assert loaded.timings["tokenizer_preloaded"] == 1.0
        assert loaded.service.context.tokenizer is preloaded
    finally:
        loaded.service.engine.stop()
        if loaded.mapped is not None:
            loaded.mapped.close()


def _greedy(loaded: object, prompt: list[int], n: int) -> list[int]:
    engine = loaded.service.engine  # type: ignore[attr-defined]
    events: queue.Queue[object] = queue.Queue()
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    engine.submit(RequestState(uuid.uuid4().hex, prompt, params), events.put)
    tokens: list[int] = []
    while not isinstance(event := events.get(timeout=60), FinishEvent):
        assert isinstance(event, TokenEvent), event
        tokens.extend(event.token_ids)
    return tokens


def test_a_cpu_load_takes_the_model_the_idle_process_built(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A transformers idle process builds each premapped entry's model over the mapping; a CPU
    load hands that very model to its engine (no views made, no skeleton built), and it
    generates what a model built at load time generates. A vLLM process builds none, and an
    entry without a model config gets none."""
    from runtime.instance.premap import Premapper

    ckpt = tmp_path / "ckpt"
    convert_checkpoint(tiny_model_dir, ckpt)
    entry = str(dram_entry(ckpt, tmp_path / f"dram-{uuid.uuid4().hex[:8]}"))
    no_config = str(dram_entry(ckpt, tmp_path / "no-config"))
    (Path(no_config) / "config.json").unlink()
    premapper = Premapper(build_models=True)
    premapper.update([entry, no_config])
    assert premapper.images[no_config].model is None
    prebuilt = premapper.images[entry].model
    assert prebuilt is not None
    image = premapper.images[entry].image
    weight = next(iter(prebuilt.parameters()))
    base = image.untyped_storage().data_ptr()
    assert base <= weight.data_ptr() < base + image.numel()  # a view of the DRAM image
    vllm_side = Premapper()
    vllm_side.update([entry])
    assert vllm_side.images[entry].model is None
    vllm_side.take(entry)

    def spec(instance_id: str) -> LoadSpec:
        return LoadSpec(
            instance_id=instance_id, function="f", handler="completion", entry_dir=entry,
            device="cpu:0", threads=1, secret="s",
        )  # fmt: skip

    loaded = load_instance(spec("a"), premapper.take(entry))
    built = load_instance(spec("b"))
    try:
        assert loaded.timings["model_prebuilt"] == 1.0
        assert built.timings["model_prebuilt"] == 0.0
        assert loaded.service.context.model is prebuilt
        assert built.service.context.model is not prebuilt
        prompt = [1, 7, 3, 11]
        assert _greedy(loaded, prompt, 6) == _greedy(built, prompt, 6)
    finally:
        for one in (loaded, built):
            one.service.engine.stop()
            if one.mapped is not None:
                one.mapped.close()
