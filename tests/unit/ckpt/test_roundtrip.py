"""Conversion then loading gives back every tensor byte for byte, with the format's layout."""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from runtime.ckpt.convert import convert_checkpoint
from runtime.ckpt.index import ALIGNMENT, image_layout, read_index
from runtime.ckpt.verify import verify_checkpoint
from runtime.loader.cpu import (
    allocate_image,
    image_from_buffer,
    tensor_views,
    verify_image,
    writable_view,
)
from runtime.loader.read import read_checkpoint
from tests.loaded import read_into_memory

from .conftest import all_dtype_tensors, as_bytes


def test_every_dtype_round_trips(dtype_ckpt: Path) -> None:
    loaded = read_into_memory(dtype_ckpt)
    expected = all_dtype_tensors()
    assert set(loaded.tensors) == set(expected)
    for name, ref in expected.items():
        got = loaded.tensors[name]
        assert got.dtype == ref.dtype, name
        assert tuple(got.shape) == tuple(ref.shape), name
        assert as_bytes(got) == as_bytes(ref), name


def test_layout_is_aligned_and_extra_files_copied(dtype_ckpt: Path) -> None:
    index = verify_checkpoint(dtype_ckpt)
    assert all(t.offset % ALIGNMENT == 0 for t in index.tensors.values())
    assert all(p.nbytes % ALIGNMENT == 0 for p in index.partitions)
    assert index.tensors["scalar"].shape == ()
    assert index.tensors["empty"].nbytes == 0
    assert set(index.files) == {"config.json", "tokenizer.json"}
    assert (dtype_ckpt / "config.json").read_text() == '{"model_type": "none"}'
    assert index.metadata["source_format"] == "safetensors"


def test_views_are_zero_copy(dtype_ckpt: Path) -> None:
    loaded = read_into_memory(dtype_ckpt)
    starts, size = image_layout(loaded.index)
    base = loaded.image.data_ptr()
    assert loaded.image.numel() == size
    for name, entry in loaded.index.tensors.items():
        if entry.nbytes:
            assert loaded.tensors[name].data_ptr() == base + starts[entry.partition] + entry.offset
    verify_image(loaded.index, loaded.image)


def test_views_over_read_only_mapping_without_copy_or_warning(dtype_ckpt: Path) -> None:
    index = read_index(dtype_ckpt)
    assert len(index.partitions) == 1
    with open(dtype_ckpt / "data-00000.bin", "rb") as f:
        region = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    image = image_from_buffer(region)  # filterwarnings=error: a warning would fail here
    views = tensor_views(index, image)
    ref = all_dtype_tensors()
    assert as_bytes(views["big"]) == as_bytes(ref["big"])
    assert views["big"].data_ptr() == image.data_ptr() + index.tensors["big"].offset
    del views, image
    region.close()


def test_small_partitions_split_and_reload(dtype_source: Path, tmp_path: Path) -> None:
    dst = tmp_path / "ckpt"
    progress: list[tuple[int, int]] = []
    index = convert_checkpoint(
        dtype_source, dst, partition_bytes=1 << 20, progress=lambda d, t: progress.append((d, t))
    )
    assert len(index.partitions) >= 2
    total = sum(t.nbytes for t in index.tensors.values())
    assert progress[0] == (0, total) and progress[-1] == (total, total)
    loaded = read_into_memory(dst, threads=3)
    assert as_bytes(loaded.tensors["big"]) == as_bytes(all_dtype_tensors()["big"])
    assert loaded.stats.bytes == index.total_bytes


def test_pytorch_bin_non_contiguous_and_tied(tmp_path: Path) -> None:
    src = tmp_path / "hf"
    src.mkdir()
    emb = torch.randn(16, 8)
    state = {
        "embed.weight": emb,
        "lm_head.weight": emb,  # tied: same storage
        "transposed": torch.randn(8, 6).t(),  # non-contiguous
        "strided": torch.arange(40, dtype=torch.int32)[::3],
        "scalar": torch.tensor(7, dtype=torch.int64),
        "bf16": torch.randn(5, 5).to(torch.bfloat16),
    }
    assert not state["transposed"].is_contiguous()
    torch.save(state, src / "pytorch_model.bin")
    index = convert_checkpoint(src, tmp_path / "ckpt")
    assert index.aliases == {"lm_head.weight": "embed.weight"}
    assert "lm_head.weight" not in index.tensors  # stored once
    assert index.metadata["source_format"] == "pytorch"
    loaded = read_into_memory(tmp_path / "ckpt")
    for name, ref in state.items():
        assert loaded.tensors[name].dtype == ref.dtype
        assert as_bytes(loaded.tensors[name]) == as_bytes(ref), name
    assert loaded.tensors["lm_head.weight"].data_ptr() == loaded.tensors["embed.weight"].data_ptr()


def test_sharded_safetensors_and_bins(tmp_path: Path) -> None:
    parts = {f"layer{i}.w": torch.full((64, 64), float(i)) for i in range(6)}
    for kind in ("safetensors", "bin"):
        src = tmp_path / kind
        src.mkdir()
        weight_map = {}
        for shard in range(3):
            names = [f"layer{i}.w" for i in (2 * shard, 2 * shard + 1)]
            if kind == "safetensors":
                fname = f"model-{shard + 1:05d}-of-00003.safetensors"
                save_file({n: parts[n] for n in names}, str(src / fname))
            else:
                fname = f"pytorch_model-{shard + 1:05d}-of-00003.bin"
                torch.save({n: parts[n] for n in names}, src / fname)
            weight_map.update(dict.fromkeys(names, fname))
        index_name = (
            f"model.{kind}.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
        )
        (src / index_name).write_text(json.dumps({"weight_map": weight_map}))
        index = convert_checkpoint(src, tmp_path / f"{kind}-ckpt")
        assert index.files == ()  # the shard index is not an extra file
        loaded = read_into_memory(tmp_path / f"{kind}-ckpt")
        assert set(loaded.tensors) == set(parts)
        for name, ref in parts.items():
            assert torch.equal(loaded.tensors[name], ref)


def test_single_weights_file_as_source(tmp_path: Path) -> None:
    save_file({"a": torch.ones(3)}, str(tmp_path / "w.safetensors"))
    convert_checkpoint(tmp_path / "w.safetensors", tmp_path / "ckpt")
    assert torch.equal(read_into_memory(tmp_path / "ckpt").tensors["a"], torch.ones(3))


def test_tmpfs_falls_back_to_buffered_reads(dtype_ckpt: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    import shutil
    import uuid

    copy = shm / f"sllm-test-{uuid.uuid4().hex[:8]}"
    shutil.copytree(dtype_ckpt, copy)
    try:
        loaded = read_into_memory(copy)  # tmpfs refuses O_DIRECT: must still load
        assert loaded.stats.direct_bytes == 0
        assert loaded.stats.buffered_bytes == loaded.index.total_bytes
        assert as_bytes(loaded.tensors["big"]) == as_bytes(all_dtype_tensors()["big"])
    finally:
        shutil.rmtree(copy)


def test_cached_file_is_read_buffered(dtype_ckpt: Path) -> None:
    index = read_index(dtype_ckpt)
    for p in index.partitions:
        (dtype_ckpt / p.file).read_bytes()  # now in the page cache
    image = allocate_image(image_layout(index)[1])
    stats = read_checkpoint(dtype_ckpt, index, writable_view(image))
    assert stats.buffered_bytes == index.total_bytes
    assert stats.direct_bytes == 0


def test_unaligned_image_still_loads(dtype_ckpt: Path) -> None:
    index = read_index(dtype_ckpt)
    size = image_layout(index)[1]
    backing = torch.zeros(size + 64, dtype=torch.uint8)
    image = backing[64:]  # not 4096-aligned: O_DIRECT impossible, buffered reads instead
    stats = read_checkpoint(dtype_ckpt, index, writable_view(image))
    assert stats.direct_bytes == 0
    assert as_bytes(tensor_views(index, image)["f32"]) == as_bytes(all_dtype_tensors()["f32"])


def test_cold_file_is_read_with_o_direct(dtype_source: Path, tmp_path: Path) -> None:
    import os

    dst = tmp_path / "ckpt"
    index = convert_checkpoint(dtype_source, dst)
    for p in index.partitions:
        fd = os.open(dst / p.file, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop it from the page cache
        os.close(fd)
    loaded = read_into_memory(dst)
    if loaded.stats.direct_bytes == 0:
        pytest.skip("this file system refuses O_DIRECT")
    assert loaded.stats.direct_bytes == index.total_bytes
    assert as_bytes(loaded.tensors["big"]) == as_bytes(all_dtype_tensors()["big"])
