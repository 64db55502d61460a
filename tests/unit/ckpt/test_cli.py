"""`sllm ckpt convert|inspect|verify` as a user runs them: output, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sllm_cli.app import run


def test_convert_inspect_verify(
    dtype_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "ckpt"
    assert run(["ckpt", "convert", str(dtype_source), str(dst), "--partition-size", "1Mi"]) == 0
    out = capsys.readouterr().out
    assert "20 tensors" in out and "partition(s)" in out

    assert run(["ckpt", "inspect", str(dst)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "DTYPE", "SHAPE", "BYTES", "PARTITION"]
    big = next(line for line in table if line.startswith("big "))
    assert big.split()[:5] == ["big", "float32", "[1000,", "700]", "2800000"]
    assert big.split()[5].startswith("data-000")
    assert table[-1].startswith("total: 20 tensors")

    assert run(["ckpt", "inspect", str(dst), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    row = next(r for r in listing["tensors"] if r["name"] == "scalar")
    assert row == {
        "name": "scalar",
        "dtype": "float32",
        "shape": [],
        "bytes": 4,
        "partition": row["partition"],
    }
    assert listing["totals"]["tensors"] == 20
    assert listing["totals"]["partitions"] == len(listing["partitions"]) >= 2

    assert run(["ckpt", "verify", str(dst)]) == 0
    assert "checksums match" in capsys.readouterr().out


def test_bad_partition_size_is_one_line(
    dtype_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        run(["ckpt", "convert", str(dtype_source), str(tmp_path / "x"), "--partition-size", "lots"])
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("sllm: error: --partition-size") and err.count("\n") == 1


def test_verify_failure_is_one_line_naming_the_partition(dtype_ckpt: Path, tmp_path: Path) -> None:
    import shutil

    ckpt = Path(shutil.copytree(dtype_ckpt, tmp_path / "ckpt"))
    part = ckpt / "data-00000.bin"
    data = bytearray(part.read_bytes())
    data[-1] ^= 0xFF
    part.write_bytes(bytes(data))
    proc = subprocess.run(
        [sys.executable, "-m", "sllm_cli.main", "ckpt", "verify", str(ckpt)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.startswith("sllm: error: ")
        and "data-00000.bin: checksum mismatch" in proc.stderr
    )


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_not_a_checkpoint_is_one_line(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["ckpt", command, str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert (
        err
        == f"sllm: error: {tmp_path / 'index.json'}: missing (not an sllm checkpoint directory)\n"
    )


def test_convert_bad_source_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "model.gguf").write_bytes(b"not gguf at all")
    assert run(["ckpt", "convert", str(tmp_path / "model.gguf"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "model.gguf: not a GGUF file" in err and err.count("\n") == 1
