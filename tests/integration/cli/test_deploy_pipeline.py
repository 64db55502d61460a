"""`fn deploy`'s local half on real files and real stores: convert once into the conversion
cache, upload once per content digest (a local directory store and a real S3 server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sllm import deploy
from tests.conftest import S3Server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def converted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("converted")
    done: list[tuple[int, int]] = []
    ckpt = deploy.prepare_checkpoint(
        deploy.ModelSource("hf", tiny_model_dir), cache, progress=lambda d, t: done.append((d, t))
    )
    assert done and done[-1][0] == done[-1][1] > 0
    return ckpt


def test_conversion_is_cached_by_source(
    converted: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.ckpt import convert

    def no_second_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(convert, "convert_checkpoint", no_second_conversion)
    again = deploy.prepare_checkpoint(deploy.ModelSource("hf", tiny_model_dir), converted.parent)
    assert again == converted
    # An sllm checkpoint is used in place.
    assert deploy.prepare_checkpoint(deploy.ModelSource("sllm", converted), Path("/nonexistent"))
    assert (converted / "index.json").is_file() and (converted / "config.json").is_file()


def test_broken_cache_entry_is_redone(
    converted: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import shutil

    source = deploy.ModelSource("hf", tiny_model_dir)
    entry = tmp_path / deploy.source_fingerprint(source)
    shutil.copytree(converted, entry)
    with open(entry / "data-00000.bin", "r+b") as f:
        f.truncate(100)
    assert deploy.prepare_checkpoint(source, tmp_path) == entry
    assert (entry / "data-00000.bin").stat().st_size == (
        converted / "data-00000.bin"
    ).stat().st_size


def test_upload_to_a_local_store_once(converted: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    sent: list[int] = []
    totals: list[int] = []

    def factory(total: int):  # type: ignore[no-untyped-def]
        totals.append(total)
        return sent.append

    key, size, pushed = deploy.upload_checkpoint(converted, "tiny", str(store), {}, factory)
    assert pushed and key.startswith("checkpoints/tiny/") and len(key.rsplit("/", 1)[1]) == 16
    assert (store / key / "index.json").is_file()
    assert sum(sent) == totals[0] > size > 0
    key2, size2, pushed2 = deploy.upload_checkpoint(converted, "tiny", str(store), {}, factory)
    assert (key2, size2, pushed2) == (key, size, False)
    assert len(totals) == 1


def test_upload_to_s3(
    converted: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As from the CLI: endpoint and credentials come from the process environment.
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.make_bucket("deploy-cli")
    url = f"s3://{bucket}/platform"
    key, _, pushed = deploy.upload_checkpoint(converted, "tiny", url)
    assert pushed
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=f"platform/{key}/")
    names = {o["Key"].rsplit("/", 1)[1] for o in listed.get("Contents", [])}
    assert {"index.json", "data-00000.bin", "config.json"} <= names
    assert deploy.upload_checkpoint(converted, "tiny", url)[2] is False
