"""The CUDA loader on a real GPU (skipped without CUDA): a DRAM entry's read-only mapping onto
the device, registered chunk by chunk or through pinned staging, byte for byte, on the device
asked for, with the streams ordered and nothing left registered or in flight."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from runtime.loader.cpu import EntryTensors, entry_tensors
from runtime.loader.cuda import (
    Chunk,
    CudaSink,
    copy_pipeline,
    image_to_device,
    plan_chunks,
    select_device,
)
from tests.loaded import dram_entry
from tests.synthetic_checkpoint import write_random_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def entry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EntryTensors]:
    """A DRAM-tier entry of ~13 MiB in 3 partitions (odd sizes) in shared memory, as a node
    keeps it, mapped read-only."""
    src = tmp_path_factory.mktemp("gpu-src") / "ck"
    write_random_checkpoint(src, (8 << 20, (4 << 20) + 4096, 12288))
    shm = Path("/dev/shm") / f"sllm-gpu-test-{uuid.uuid4().hex[:8]}"
    try:
        mapped = entry_tensors(dram_entry(src, shm))
        yield mapped
        mapped.close()
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def _last_device() -> str:
    return f"cuda:{torch.cuda.device_count() - 1}"


@pytest.mark.parametrize("staging", [False, True])
def test_image_reaches_the_device_byte_for_byte(entry: EntryTensors, staging: bool) -> None:
    device = _last_device()
    placed = image_to_device(entry.index, entry.image, device, chunk_bytes=1 << 20, staging=staging)
    assert placed.image.device == torch.device(device)
    assert torch.cuda.current_device() == torch.device(device).index
    assert torch.equal(placed.image.cpu(), entry.image)
    for name, t in entry.tensors.items():
        assert placed.tensors[name].device == torch.device(device)
        assert torch.equal(placed.tensors[name].cpu(), t), name
    # every byte came from page-locked memory (DMA), in the mode asked for
    assert placed.stats.pinned_bytes == placed.stats.bytes == entry.image.numel()
    assert placed.stats.mode == ("staging" if staging else "registered")
    # registrations are undone once the copy is over
    assert not entry.image[: 1 << 20].is_pinned()
    assert not entry.image[-4096:].is_pinned()


def test_select_device_opens_the_context_there_only() -> None:
    """In a fresh process: the instance's device is the only one with a context."""
    import json
    import subprocess
    import sys

    device = _last_device()
    code = (
        "import json, sys, torch\n"
        "from runtime.loader.cuda import select_device\n"
        "from tests.gpu.contexts import active_contexts\n"
        "d = select_device(sys.argv[1]); x = torch.ones(4, device=d)\n"
        "print(json.dumps({'current': torch.cuda.current_device(), 'contexts': active_contexts()}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, device], capture_output=True, text=True, check=True
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    index = torch.device(device).index
    assert report == {"current": index, "contexts": [index]}


def test_side_stream_waits_for_the_destinations_stream() -> None:
    """Work queued on the current stream before the copy (here: a long sleep, then a fill of
    the destination) must be over before the copy writes: otherwise the fill lands last."""
    select_device(_last_device())
    host = torch.arange(1 << 20, dtype=torch.int32).view(torch.uint8).pin_memory()
    dest = torch.empty_like(host, device="cuda")
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on the current stream
    dest.fill_(7)
    sink = CudaSink(dest)
    copy_pipeline(
        plan_chunks(host.numel(), 1 << 20), lambda c, s: host[c.at : c.at + c.length], sink
    )
    assert torch.equal(dest.cpu(), host)


def test_a_failed_preparation_leaves_no_copy_in_flight() -> None:
    select_device(_last_device())
    host = torch.randint(0, 255, (64 << 20,), dtype=torch.uint8).pin_memory()
    dest = torch.zeros_like(host, device="cuda")
    sink = CudaSink(dest)

    def prepare(chunk: Chunk, slot: int) -> torch.Tensor:
        if chunk.at == 40 << 20:
            raise OSError("DRAM image went away")
        return host[chunk.at : chunk.at + chunk.length]

    with pytest.raises(OSError, match="went away"):
        copy_pipeline(plan_chunks(host.numel(), 4 << 20), prepare, sink)
    assert sink.stream.query()  # nothing still running on the side stream
    assert torch.equal(dest[: 40 << 20].cpu(), host[: 40 << 20])


def test_two_devices_each_get_their_copy(entry: EntryTensors) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    placed = [image_to_device(entry.index, entry.image, f"cuda:{i}") for i in (0, 1)]
    for i, p in enumerate(placed):
        assert p.image.device == torch.device("cuda", i)
        assert torch.equal(p.image.cpu(), entry.image)
    with pytest.raises(Exception, match="CUDA device"):
        select_device(f"cuda:{torch.cuda.device_count()}")
