"""Every bad input gives a CheckpointError naming the file and the problem."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from runtime.ckpt.convert import convert_checkpoint
from runtime.ckpt.index import INDEX_FILE, read_index
from runtime.ckpt.verify import verify_checkpoint
from sllm.errors import CheckpointError
from tests.loaded import read_into_memory


@pytest.fixture
def ckpt(dtype_ckpt: Path, tmp_path: Path) -> Path:
    """A private copy of the all-dtypes checkpoint to damage."""
    return Path(shutil.copytree(dtype_ckpt, tmp_path / "ckpt"))


def _edit_index(ckpt: Path, edit: object) -> None:
    data = json.loads((ckpt / INDEX_FILE).read_text())
    edit(data)  # type: ignore[operator]
    (ckpt / INDEX_FILE).write_text(json.dumps(data))


def test_truncated_partition(ckpt: Path) -> None:
    part = ckpt / "data-00000.bin"
    with open(part, "r+b") as f:
        f.truncate(part.stat().st_size - 4096)
    for check in (verify_checkpoint, read_into_memory):
        with pytest.raises(CheckpointError, match=r"data-00000\.bin: partition is .*truncated"):
            check(ckpt)


def test_flipped_byte(ckpt: Path) -> None:
    part = ckpt / "data-00000.bin"
    data = bytearray(part.read_bytes())
    data[read_index(ckpt).tensors["big"].offset + 123] ^= 0x01
    part.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"data-00000\.bin: checksum mismatch"):
        verify_checkpoint(ckpt)


def test_missing_index(ckpt: Path) -> None:
    (ckpt / INDEX_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"index\.json: missing"):
        read_into_memory(ckpt)


def test_garbled_index(ckpt: Path) -> None:
    (ckpt / INDEX_FILE).write_text('{"format": "sllm-ckpt", "tensors": ')
    with pytest.raises(CheckpointError, match=r"index\.json: garbled index"):
        verify_checkpoint(ckpt)


def test_entry_pointing_outside_its_file(ckpt: Path) -> None:
    def edit(data: dict) -> None:  # type: ignore[type-arg]
        size = data["partitions"][0]["nbytes"]
        data["tensors"]["big"]["offset"] = size  # aligned, but past the end

    _edit_index(ckpt, edit)
    with pytest.raises(
        CheckpointError,
        match=r"index\.json: tensor 'big' ends at byte .* past the end of data-00000\.bin",
    ):
        read_into_memory(ckpt)


def test_unknown_dtype_in_index(ckpt: Path) -> None:
    _edit_index(ckpt, lambda d: d["tensors"]["f32"].update(dtype="complex64"))
    with pytest.raises(
        CheckpointError, match=r"index\.json: tensor 'f32' has unknown dtype 'complex64'"
    ):
        read_index(ckpt)


def test_unknown_dtype_in_source(tmp_path: Path) -> None:
    src = tmp_path / "c.safetensors"
    save_file({"c": torch.zeros(2, dtype=torch.complex64)}, str(src))
    with pytest.raises(
        CheckpointError, match=r"c\.safetensors: tensor 'c' has unknown dtype 'C64'"
    ):
        convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs/path", "a/../b", "x/.."])
def test_path_like_tensor_name_in_index(ckpt: Path, name: str) -> None:
    _edit_index(ckpt, lambda d: d["tensors"].update({name: d["tensors"].pop("f32")}))
    with pytest.raises(
        CheckpointError, match=r"index\.json: tensor name .* path separator or '\.\.'"
    ):
        read_into_memory(ckpt)


def test_path_like_tensor_name_in_source(tmp_path: Path) -> None:
    src = tmp_path / "w.safetensors"
    save_file({"a/../b": torch.zeros(2)}, str(src))
    with pytest.raises(CheckpointError, match=r"w\.safetensors: tensor name 'a/\.\./b'"):
        convert_checkpoint(src, tmp_path / "out")


@pytest.mark.parametrize(
    ("filename", "content", "problem"),
    [
        ("model.safetensors", b"PK\x03\x04 this is a zip", "not a safetensors file"),
        ("model.safetensors", struct.pack("<Q", 4) + b"[1]x", "not a safetensors file"),
        ("model.safetensors", b"", "not a safetensors file"),
        ("pytorch_model.bin", b"GGUF is not a torch archive" * 10, "not a PyTorch checkpoint"),
        ("model.gguf", b'{"json": true}', "not a GGUF file"),
    ],
)
def test_source_not_what_its_extension_says(
    tmp_path: Path, filename: str, content: bytes, problem: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / filename).write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"{filename}: {problem}"):
        convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_safetensors_offsets_beyond_file(tmp_path: Path) -> None:
    src = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(1024)}, str(src))
    with open(src, "r+b") as f:
        f.truncate(src.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'a' data_offsets"):
        convert_checkpoint(src, tmp_path / "out")


def test_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights found"):
        convert_checkpoint(tmp_path, tmp_path / "out")


def test_converting_a_converted_checkpoint_is_refused(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"ckpt: already an sllm checkpoint"):
        convert_checkpoint(ckpt, tmp_path / "again")


def test_existing_destination_is_refused(dtype_source: Path, ckpt: Path) -> None:
    with pytest.raises(CheckpointError, match="already exists"):
        convert_checkpoint(dtype_source, ckpt)


def test_interrupted_conversion_leaves_nothing_that_looks_valid(
    dtype_source: Path, tmp_path: Path
) -> None:
    def interrupt(done: int, total: int) -> None:
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(dtype_source, tmp_path / "out", progress=interrupt)
    assert list(tmp_path.iterdir()) == []  # no destination, no temporary directory left


def test_killed_conversion_leaves_no_destination(dtype_source: Path, tmp_path: Path) -> None:
    """A conversion killed outright (no cleanup runs) leaves only a hidden temp directory
    without an index: never the destination."""
    import os
    import signal
    import subprocess
    import sys
    import time

    big = tmp_path / "big"
    big.mkdir()
    save_file({f"t{i}": torch.zeros(1 << 20) for i in range(8)}, str(big / "model.safetensors"))
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from runtime.ckpt.convert import convert_checkpoint\n"
        "def slow(done, total):\n"
        "    print('progress', flush=True); time.sleep(0.2)\n"
        "convert_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]), progress=slow)\n"
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(big), str(out)], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    for _ in range(2):
        proc.stdout.readline()  # conversion is under way
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    time.sleep(0.05)
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name not in ("big",)]
    assert all(p.name.startswith(".out.tmp-") for p in leftovers)
    for p in leftovers:
        assert not (p / INDEX_FILE).exists()
        with pytest.raises(CheckpointError, match="missing"):
            read_index(p)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: shard listed"):
        convert_checkpoint(tmp_path, tmp_path / "out")
