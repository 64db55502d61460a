"""The store port and the tiered cache against a real S3 server (SeaweedFS on loopback).

Faults a real server will not produce on demand (5xx answers) are injected with a botocore
``before-send`` hook on the client: every other byte goes through the real server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.cache import BandwidthEstimator, DramCache, SsdCache, TieredCache
from runtime.ckpt.index import CheckpointIndex, image_layout
from runtime.store.push import push_checkpoint
from runtime.store.s3 import S3Store, make_client
from sllm.errors import CheckpointError, StoreError
from sllm_cli.servers import free_port
from tests.synthetic_checkpoint import write_random_checkpoint

pytestmark = pytest.mark.integration
MiB = 1 << 20
BUCKET = "sllm-tiers"
KEY = "checkpoints/chat/00000000000000aa"


@pytest.fixture
def s3_env(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    s3_server.make_bucket(BUCKET)
    return s3_server


def s3_store(server: Any, bucket: str = BUCKET, endpoint: str | None = None, **kw: Any) -> S3Store:
    """A store on the test server; credentials are resolved from the environment at client
    creation, so they are set only for that moment (nothing leaks into other tests)."""
    saved = dict(os.environ)
    os.environ.update(server.env())
    try:
        client = make_client(endpoint or server.endpoint, "us-east-1", True, 4)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    opts: dict[str, Any] = {"concurrency": 4, "part_size": 5 * MiB, "retries": 3}
    opts.update(kw)
    return S3Store(client, bucket, "tests", **opts)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CheckpointIndex]:
    directory = tmp_path_factory.mktemp("ck") / "ck"
    # 12 MiB + 5 bytes: a 3-part multipart upload and 3 ranged GETs of 5 MiB.
    return directory, write_random_checkpoint(directory, (12 * MiB + 5, 100_000))


@pytest.fixture(scope="module")
def pushed(s3_server: Any, ckpt: tuple[Path, CheckpointIndex]) -> str:
    s3_server.make_bucket(BUCKET)
    push_checkpoint(ckpt[0], s3_store(s3_server), KEY)
    return KEY


@pytest.fixture
def tiered(tmp_path: Path) -> Iterator[Callable[[S3Store], TieredCache]]:
    made: list[TieredCache] = []

    def make(store: S3Store) -> TieredCache:
        cache = TieredCache(
            store,
            SsdCache(tmp_path / "ssd", 256 * MiB),
            DramCache(tmp_path / "dram", 256 * MiB),
            BandwidthEstimator(),
        )
        made.append(cache)
        return cache

    yield make
    for c in made:
        c.close()


def image_ok(path: Path, src: Path, index: CheckpointIndex) -> bool:
    starts, _ = image_layout(index)
    data = path.read_bytes()
    return all(
        data[s : s + p.nbytes] == (src / p.file).read_bytes()
        for s, p in zip(starts, index.partitions, strict=True)
    )


def nothing_cached(cache: TieredCache, tmp_path: Path) -> bool:
    cache.flush()
    empty = cache.contents() == {"dram": [], "ssd": []}
    return (
        empty
        and not list((tmp_path / "ssd" / "tmp").iterdir())
        and not list((tmp_path / "dram" / "tmp").iterdir())
    )


def test_pipelined_pull_from_s3(
    s3_env: Any, pushed: str, ckpt: tuple[Path, CheckpointIndex], tiered: Any
) -> None:
    store = s3_store(s3_env)
    assert store.list("checkpoints/chat") == sorted(
        f"{KEY}/{n}" for n in ("config.json", "data-00000.bin", "data-00001.bin", "index.json")
    )
    cache = tiered(store)
    result = cache.fetch(pushed)
    assert result.tier == "store" and image_ok(result.image_path, *ckpt)
    cache.flush()
    assert [k for k, _, _ in cache.contents()["ssd"]] == [pushed]
    cache.release(pushed)
    cache.dram.entries.remove(pushed)
    again = cache.fetch(pushed)
    assert again.tier == "ssd" and image_ok(again.image_path, *ckpt)
    assert cache.bandwidths.snapshot()["store"] > 0


def test_cli_push(s3_env: Any, ckpt: tuple[Path, CheckpointIndex]) -> None:
    url = f"s3://{BUCKET}/cli/ck"
    done = subprocess.run(
        [sys.executable, "-m", "sllm_cli.main", "ckpt", "push", str(ckpt[0]), url, "--no-progress"],
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    assert done.returncode == 0, done.stderr
    assert f"-> {url}" in done.stdout
    client = s3_env.client()
    names = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="cli/ck/")["Contents"]]
    assert "cli/ck/index.json" in names and "cli/ck/data-00000.bin" in names
    head = client.head_object(Bucket=BUCKET, Key="cli/ck/data-00000.bin")
    assert head["ContentLength"] == ckpt[1].partitions[0].nbytes


def test_missing_bucket_and_object(s3_env: Any, pushed: str, tiered: Any, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist") as err:
        tiered(s3_store(s3_env, bucket="no-such-bucket")).fetch(pushed)
    assert err.value.code == "store_bucket_not_found"
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        s3_store(s3_env, bucket="no-such-bucket").exists("a")
    cache = tiered(s3_store(s3_env))
    assert not cache.store.exists("absent/index.json") and cache.store.exists(f"{KEY}/index.json")
    with pytest.raises(StoreError, match=rf"s3://{BUCKET}/tests/absent/index\.json not found"):
        cache.fetch("absent")
    assert nothing_cached(cache, tmp_path)


def test_corrupt_object(
    s3_env: Any, ckpt: tuple[Path, CheckpointIndex], tiered: Any, tmp_path: Path
) -> None:
    store = s3_store(s3_env)
    push_checkpoint(ckpt[0], store, "corrupt")
    data = bytearray((ckpt[0] / "data-00000.bin").read_bytes())
    data[7 * MiB] ^= 0xFF
    store.put_bytes("corrupt/data-00000.bin", bytes(data))
    cache = tiered(store)
    with pytest.raises(CheckpointError, match=r"tests/corrupt/data-00000\.bin: checksum"):
        cache.fetch("corrupt")
    assert nothing_cached(cache, tmp_path)


def fail_gets(store: S3Store, times: int) -> list[float]:
    """Answer the next ``times`` ranged GETs with 503; returns the list of backoff sleeps."""
    from botocore.awsrequest import AWSResponse

    class Raw:
        def stream(self, **_: Any) -> Iterator[bytes]:
            yield b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"

    left = [times]

    def before_send(request: Any, **_: Any) -> AWSResponse | None:
        if "Range" in request.headers and left[0] > 0:
            left[0] -= 1
            return AWSResponse(request.url, 503, {}, Raw())
        return None

    store.client.meta.events.register("before-send.s3.GetObject", before_send)
    sleeps: list[float] = []
    store._sleep = sleeps.append
    return sleeps


def test_5xx_is_retried_with_backoff(
    s3_env: Any, pushed: str, ckpt: tuple[Path, CheckpointIndex], tiered: Any
) -> None:
    store = s3_store(s3_env, concurrency=1)
    sleeps = fail_gets(store, times=2)
    result = tiered(store).fetch(pushed)
    assert result.tier == "store" and image_ok(result.image_path, *ckpt)
    assert sleeps == [0.2, 0.4]


def test_5xx_until_retries_run_out(s3_env: Any, pushed: str, tiered: Any, tmp_path: Path) -> None:
    store = s3_store(s3_env, concurrency=1)
    sleeps = fail_gets(store, times=1000)
    cache = tiered(store)
    with pytest.raises(StoreError, match=r"unavailable after 3 attempts \(HTTP 503"):
        cache.fetch(pushed)
    assert len(sleeps) == 2
    assert nothing_cached(cache, tmp_path)


def test_unreachable_store(s3_env: Any, tiered: Any, tmp_path: Path) -> None:
    store = s3_store(s3_env, endpoint=f"http://127.0.0.1:{free_port()}", retries=2)
    store._sleep = lambda _s: None
    cache = tiered(store)
    with pytest.raises(StoreError, match=r"unavailable after 2 attempts \(EndpointConnectionError"):
        cache.fetch(KEY)
    assert nothing_cached(cache, tmp_path)


def test_open_store_with_credentials_from_settings(
    s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.store import open_store
    from sllm.settings import StoreSettings

    s3_server.make_bucket(BUCKET)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    env = {
        "SLLM_STORE_URL": f"s3://{BUCKET}/via-settings",
        "SLLM_S3_ENDPOINT": s3_server.endpoint,
        "SLLM_S3_ACCESS_KEY_ID": s3_server.key_id,
        "SLLM_S3_SECRET_ACCESS_KEY": s3_server.secret,
    }
    settings = StoreSettings.from_env(env)
    assert s3_server.secret not in repr(settings)
    store = open_store(settings)
    store.put_bytes("a/b.txt", b"hello")
    assert store.get_bytes("a/b.txt") == b"hello" and store.list("a") == ["a/b.txt"]
    wrong = open_store(StoreSettings.from_env({**env, "SLLM_S3_SECRET_ACCESS_KEY": "nope"}))
    with pytest.raises(StoreError, match="access denied"):
        wrong.get_bytes("a/b.txt")
