"""An instance loaded on CUDA the way a node loads it (skipped without CUDA): ``load_instance``
from a DRAM entry in shared memory, in a fresh process, on the device asked for and no other,
every parameter on it and equal to the DRAM bytes, every byte copied from pinned memory, and
generation through the engine (prefill, batched decoding with ``KVBatch``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from runtime.ckpt.convert import convert_checkpoint
from tests.loaded import dram_entry

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# Runs in the instance's own process, as runtime.instance.worker does: load_instance, then
# the checks that need the loaded objects, reported as one JSON line.
PROBE = r"""
import json, queue, sys
import torch
from runtime.engine.request import FinishEvent, RequestState, TokenEvent
from runtime.engine.sampling import SamplingParams
from runtime.instance.loading import LoadSpec, load_instance
from runtime.loader.cpu import entry_tensors
from tests.gpu.contexts import active_contexts

entry, device = sys.argv[1], sys.argv[2]
spec = LoadSpec(instance_id="gpu-test", function="f", handler="completion",
                entry_dir=entry, device=device)
loaded = load_instance(spec)
model = loaded.service.context.model
dram = entry_tensors(entry)
mismatched = [n for n, p in model.named_parameters()
              if not torch.equal(p.detach().cpu(), dram.tensors[n])]
engine = loaded.service.engine

def run(prompts):
    queues = []
    for i, ids in enumerate(prompts):
        q = queue.Queue()
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        engine.submit(RequestState(f"r{i}", ids, params), q.put)
        queues.append(q)
    outputs = []
    for q in queues:
        ids = []
        while True:
            event = q.get(timeout=120)
            if isinstance(event, TokenEvent):
                ids.extend(event.token_ids)
            elif isinstance(event, FinishEvent):
                break
            else:
                raise SystemExit(f"engine error: {event}")
        outputs.append(ids)
    return outputs

prompts = [[1, 5, 9, 14, 3], [2, 7, 7, 30]]
alone = [run([p])[0] for p in prompts]
together = run(prompts)  # both decoded in one batch (KVBatch)
ids = torch.tensor([prompts[0]], device=model.device)
reference = model.generate(ids, max_new_tokens=12, do_sample=False)
engine.stop()
print(json.dumps({
    "current": torch.cuda.current_device(),
    "contexts": active_contexts(),
    "param_devices": sorted({str(p.device) for p in model.parameters()}),
    "buffer_devices": sorted({str(b.device) for b in model.buffers()}),
    "mismatched": mismatched,
    "pinned_bytes": loaded.timings["pinned_bytes"],
    "image_bytes": dram.image.numel(),
    "mapping_kept": loaded.mapped is not None,
    "alone": alone, "together": together,
    "generate": reference[0, len(prompts[0]):].tolist(),
}))
"""


@pytest.fixture(scope="module")
def entry(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    ckpt = tmp_path_factory.mktemp("gpu-instance") / "ckpt"
    convert_checkpoint(tiny_model_dir, ckpt)
    shm = Path("/dev/shm") / f"sllm-gpu-test-{uuid.uuid4().hex[:8]}"
    try:
        yield dram_entry(ckpt, shm)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def _start(entry: Path, device: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PROBE, str(entry), device],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _report(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    report: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return report


def _check(report: dict[str, object], index: int) -> None:
    device = f"cuda:{index}"
    assert report["current"] == index
    assert report["contexts"] == [index]  # no context opened on any other device
    assert report["param_devices"] == [device]
    assert report["buffer_devices"] == [device]
    assert report["mismatched"] == []  # every parameter equals the DRAM bytes
    assert report["pinned_bytes"] == report["image_bytes"]  # all of it by DMA
    assert report["mapping_kept"] is False  # the DRAM mapping is closed after the copy
    alone, together = report["alone"], report["together"]
    assert isinstance(alone, list) and all(len(ids) == 12 for ids in alone)
    # batched decoding may round differently from decoding alone (other GEMM shapes), so
    # only the first token (each request's own prefill) must agree exactly
    assert isinstance(together, list) and [len(ids) for ids in together] == [12, 12]
    assert [ids[0] for ids in together] == [ids[0] for ids in alone]
    generated = report["generate"]  # transformers' generate on the same model (batch of 1);
    assert isinstance(generated, list) and generated  # it stops early at an EOS token
    assert alone[0][: len(generated)] == generated


def test_load_instance_and_generate_on_cuda(entry: Path) -> None:
    # the last device: where there are several, a context defaulting to GPU 0 would show
    index = torch.cuda.device_count() - 1
    _check(_report(_start(entry, f"cuda:{index}")), index)


def test_two_instances_on_two_devices(entry: Path) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    procs = [_start(entry, f"cuda:{i}") for i in (0, 1)]
    for i, proc in enumerate(procs):
        _check(_report(proc), i)
