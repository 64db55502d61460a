"""The store port and the tiered cache against a real S3 server (SeaweedFS on loopback).

Faults a real server will not produce on demand (5xx answers) come from a forward HTTP proxy
on loopback (``HTTP_PROXY``), which answers some ranged GETs itself and relays every other
request to the real server: the checkpoint's ranged GETs honour the environment's proxy, as
boto3's requests do.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from runtime.cache import BandwidthEstimator, DramCache, SsdCache, TieredCache
from runtime.ckpt.index import CheckpointIndex, image_layout
from runtime.store.push import push_checkpoint
from runtime.store.s3 import S3Store, make_client
from sllm.errors import CheckpointError, StoreError
from sllm_cli.servers import free_port
from tests.loopback_http import LoopbackServer, QuietHandler
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


def test_a_failed_ssd_copy_leaves_dram_served(
    s3_env: Any,
    pushed: str,
    ckpt: tuple[Path, CheckpointIndex],
    tiered: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The disk fills during the SSD copy (which starts once DRAM is complete): the SSD entry
    is discarded, the DRAM entry serves, nothing is left half-written."""
    from runtime.cache.ssd import SsdWriter

    real_write, writes = SsdWriter.write, []

    def write(self: SsdWriter, *args: Any) -> None:
        writes.append(args[:2])
        if len(writes) == 2:
            raise OSError(28, "No space left on device")
        real_write(self, *args)

    monkeypatch.setattr(SsdWriter, "write", write)
    cache = tiered(s3_store(s3_env))
    result = cache.fetch(pushed)
    assert result.tier == "store" and image_ok(result.image_path, *ckpt)
    cache.flush()
    assert writes == [(0, 0), (1, 0)]  # one write per partition (each under 16 MiB)
    assert cache.contents()["ssd"] == [] and not list((tmp_path / "ssd" / "tmp").iterdir())
    assert [k for k, _, _ in cache.contents()["dram"]] == [pushed]
    assert image_ok(result.image_path, *ckpt)
    cache.release(pushed)


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
    # the checkpoint's bytes come by ranged GETs of presigned URLs: the same errors
    buf = memoryview(bytearray(16))
    with pytest.raises(
        StoreError, match=rf"s3://{BUCKET}/tests/absent/data\.bin bytes 0-15 not found"
    ):
        cache.store.read_range("absent/data.bin", 0, buf)
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist") as err:
        s3_store(s3_env, bucket="no-such-bucket").read_range(f"{KEY}/data-00001.bin", 0, buf)
    assert err.value.code == "store_bucket_not_found"


def test_ranges_at_and_past_the_end(
    s3_env: Any, pushed: str, ckpt: tuple[Path, CheckpointIndex]
) -> None:
    store = s3_store(s3_env)
    data = (ckpt[0] / "data-00001.bin").read_bytes()  # 100 000 bytes
    buf = bytearray(1000)
    store.read_range(f"{KEY}/data-00001.bin", 99_000, memoryview(buf))
    assert bytes(buf) == data[99_000:]
    with pytest.raises(
        StoreError, match=r"data-00001\.bin: object ends at byte 100000, expected at least 100500"
    ):
        store.read_range(f"{KEY}/data-00001.bin", 99_500, memoryview(buf))
    with pytest.raises(StoreError, match=r"data-00001\.bin bytes 200000-200999: InvalidRange"):
        store.read_range(f"{KEY}/data-00001.bin", 200_000, memoryview(buf))


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


class FaultProxy(LoopbackServer):
    """A forward HTTP proxy: answers the next ``fail`` ranged GETs with 503 (an S3 error
    document), relays every other request to its origin; ``ranged`` counts the ranged GETs
    it saw."""

    def __init__(self, fail: int) -> None:
        super().__init__(_ProxyHandler)
        self.fail = fail
        self.ranged = 0
        self.lock = threading.Lock()


class _ProxyHandler(QuietHandler):
    server: FaultProxy

    def do_GET(self) -> None:
        self._relay("GET")

    def do_HEAD(self) -> None:
        self._relay("HEAD")

    def _relay(self, method: str) -> None:
        url = urlsplit(self.path)  # absolute form: this is a proxy
        with self.server.lock:
            ranged = "Range" in self.headers
            self.server.ranged += ranged
            fail = ranged and self.server.fail > 0
            self.server.fail -= fail
        if fail:
            self.answer(
                503, b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
            )
            return
        origin = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
        skip = {"connection", "proxy-connection", "keep-alive", "transfer-encoding"}
        origin.request(
            method,
            f"{url.path}?{url.query}" if url.query else url.path,
            headers={k: v for k, v in self.headers.items() if k.lower() not in skip},
        )
        answer = origin.getresponse()
        data = answer.read()
        self.send_response(answer.status, answer.reason)
        for k, v in answer.getheaders():
            if k.lower() not in skip | {"content-length"}:
                self.send_header(k, v)
        self.send_header("Content-Length", answer.getheader("Content-Length") or str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        origin.close()


@pytest.fixture
def fault_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], FaultProxy]]:
    """``start(fail)``: a FaultProxy set as this test's HTTP_PROXY."""
    started: list[FaultProxy] = []

    def start(fail: int) -> FaultProxy:
        proxy = FaultProxy(fail)
        proxy.start()
        started.append(proxy)
        for var in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def no_sleeps(store: S3Store) -> list[float]:
    """Record the store's backoff sleeps instead of sleeping."""
    sleeps: list[float] = []
    store._sleep = sleeps.append
    return sleeps


def test_5xx_is_retried_with_backoff(
    s3_env: Any, pushed: str, ckpt: tuple[Path, CheckpointIndex], tiered: Any, fault_proxy: Any
) -> None:
    proxy = fault_proxy(2)
    store = s3_store(s3_env, concurrency=1)
    sleeps = no_sleeps(store)
    result = tiered(store).fetch(pushed)
    assert result.tier == "store" and image_ok(result.image_path, *ckpt)
    assert sleeps == [0.2, 0.4]
    # through the proxy: 2 refused, then the 3 ranges of the first partition and 1 of the second
    assert proxy.ranged == 2 + 3 + 1


def test_5xx_until_retries_run_out(
    s3_env: Any, pushed: str, tiered: Any, tmp_path: Path, fault_proxy: Any
) -> None:
    fault_proxy(1000)
    store = s3_store(s3_env, concurrency=1)
    sleeps = no_sleeps(store)
    cache = tiered(store)
    with pytest.raises(StoreError, match=r"unavailable after 3 attempts \(HTTP 503 ServiceUnav"):
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
    with pytest.raises(StoreError, match=r"a/b\.txt bytes 0-2: .*access denied"):
        wrong.read_range("a/b.txt", 0, memoryview(bytearray(3)))
    got = bytearray(3)
    store.read_range("a/b.txt", 1, memoryview(got))
    assert got == b"ell"
