"""LocalStore and push_checkpoint: verified first, index last, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.store import LocalStore
from runtime.store.base import join_key, validate_key
from runtime.store.push import push_checkpoint
from sllm.errors import CheckpointError, StoreError
from tests.synthetic_checkpoint import corrupt_byte, write_random_checkpoint


def test_push_then_read_back(tmp_path: Path) -> None:
    index = write_random_checkpoint(tmp_path / "ck", (5000, 9000))
    store = LocalStore(tmp_path / "store")
    order: list[str] = []
    put_file = store.put_file

    def spy(key: str, path: str, progress=lambda n: None) -> None:  # type: ignore[no-untyped-def]
        order.append(key)
        put_file(key, path, progress)

    store.put_file = spy  # type: ignore[method-assign]
    sent: list[int] = []
    push_checkpoint(tmp_path / "ck", store, "ck/v1", progress=sent.append)
    assert order == ["ck/v1/data-00000.bin", "ck/v1/data-00001.bin", "ck/v1/config.json"]
    assert store.list("ck") == sorted([*order, "ck/v1/index.json"])
    names = ["data-00000.bin", "data-00001.bin", "config.json", "index.json"]
    assert sum(sent) == sum((tmp_path / "ck" / f).stat().st_size for f in names)
    assert index.total_bytes == 14000
    buf = bytearray(100)
    store.read_range("ck/v1/data-00001.bin", 4000, memoryview(buf))
    assert bytes(buf) == (tmp_path / "ck" / "data-00001.bin").read_bytes()[4000:4100]
    assert store.size("ck/v1/data-00000.bin") == 5000
    with pytest.raises(StoreError, match="ends at byte 9000"):
        store.read_range("ck/v1/data-00001.bin", 8950, memoryview(bytearray(100)))


def test_push_refuses_a_corrupt_checkpoint(tmp_path: Path) -> None:
    write_random_checkpoint(tmp_path / "ck", (5000,))
    corrupt_byte(tmp_path / "ck" / "data-00000.bin")
    store = LocalStore(tmp_path / "store")
    with pytest.raises(CheckpointError, match=r"data-00000\.bin: checksum"):
        push_checkpoint(tmp_path / "ck", store, "ck")
    assert store.list("") == []


def test_missing_object_is_named(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(StoreError, match=r"nope/index\.json not found") as err:
        store.get_bytes("nope/index.json")
    assert err.value.code == "store_not_found"
    assert not store.exists("nope")


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "a\\b"])
def test_keys_cannot_escape_the_root(key: str) -> None:
    with pytest.raises(StoreError, match="invalid store key"):
        validate_key(key)


def test_join_key_skips_empty_parts() -> None:
    assert join_key("", "a/", "/b") == "a/b"


def test_cli_push_to_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sllm_cli.app import run

    write_random_checkpoint(tmp_path / "ck", (5000,))
    dst = tmp_path / "store" / "checkpoints" / "x"
    assert run(["ckpt", "push", str(tmp_path / "ck"), str(dst), "--no-progress"]) == 0
    assert f"-> {dst}" in capsys.readouterr().out
    assert sorted(p.name for p in dst.iterdir()) == [
        "config.json",
        "data-00000.bin",
        "index.json",
    ]
    corrupt_byte(tmp_path / "ck" / "data-00000.bin")
    assert run(["ckpt", "push", str(tmp_path / "ck"), str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sllm: error: ") and "data-00000.bin: checksum" in err
    assert not (tmp_path / "other").exists()
    assert run(["ckpt", "push", str(tmp_path / "missing"), str(dst)]) == 1
    assert "not a directory" in capsys.readouterr().err
