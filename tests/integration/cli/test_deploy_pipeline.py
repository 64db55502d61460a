"""`fn deploy`'s local half on real files and real stores: convert once into the conversion
cache, upload once per content digest (a local directory store and a real S3 server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sllm_cli import deploy
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


# --- issue 14, bugs 2 and 4: what an instance reads is the checkpoint's identity, checked ----


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_changed_config_tokenizer_or_template_is_a_new_checkpoint(
    converted: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    first, _, _ = deploy.upload_checkpoint(converted, "tiny", str(store))
    keys = {first}
    for name, edit in (
        ("chat_template.jinja", lambda t: t.replace("<|assistant|>", "<|assistant|> ")),
        ("generation_config.json", lambda t: t.replace("{", '{"top_k": 5, ', 1)),
        ("tokenizer_config.json", lambda t: t.replace("{", '{"model_max_length": 77, ', 1)),
    ):
        changed = _copy(converted, tmp_path / name)
        (changed / name).write_text(edit((changed / name).read_text()))
        deploy.check_checkpoint(changed)
        key, _, pushed = deploy.upload_checkpoint(changed, "tiny", str(store))
        assert pushed and key not in keys, name  # it reaches the store, under a new key
        assert (store / key / name).read_text() == (changed / name).read_text()
        keys.add(key)


def test_a_broken_config_fails_the_deploy_and_the_fixed_one_deploys(
    converted: Path, tmp_path: Path
) -> None:
    from sllm.errors import CheckpointError

    broken = _copy(converted, tmp_path / "broken")
    good_config = (broken / "config.json").read_text()
    (broken / "config.json").write_text(
        good_config.replace('"num_attention_heads": 4', '"num_attention_heads": 3')
    )
    with pytest.raises(CheckpointError, match=r"config\.json: the model config does not build"):
        deploy.check_checkpoint(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        deploy.check_checkpoint(broken)
    (broken / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    (broken / "config.json").write_text(good_config)
    with pytest.raises(CheckpointError, match="chat template"):
        deploy.check_checkpoint(broken)
    (broken / "chat_template.jinja").write_text((converted / "chat_template.jinja").read_text())
    deploy.check_checkpoint(broken)  # fixed: it deploys
    store = tmp_path / "store"
    assert (
        deploy.upload_checkpoint(broken, "tiny", str(store))[0]
        == (deploy.upload_checkpoint(converted, "tiny", str(store))[0])
    )


def test_nan_weights_are_refused_at_conversion(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from runtime.ckpt.convert import convert_checkpoint
    from sllm.errors import CheckpointError
    from tests.tiny_model import build_tiny_llama

    src = build_tiny_llama(tmp_path / "hf", seed=3)
    weights = load_file(src / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' \(float32\) has NaN .*\(all\)"):
        convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
