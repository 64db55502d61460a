"""``Store`` on any S3-compatible server (AWS, MinIO, SeaweedFS) through boto3.

- Downloads are ranged GETs of URLs the boto3 client presigns, read from the socket straight
  into the caller's buffer (runtime.store.ranged says why and what it measured); callers run
  ``concurrency`` of them at once (runtime.cache.pull). Everything else goes through boto3.
- Uploads of files larger than one part are multipart, ``concurrency`` parts in parallel.
- Every request is retried ``retries`` times with exponential backoff on 5xx answers and
  connection errors (botocore's own retries are off so the bound is ours), then fails with a
  ``StoreError`` that names the object and the last cause. A missing bucket or object is named
  in the error and never retried.
"""

from __future__ import annotations

import logging
import math
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from runtime.store.base import (
    BUCKET_NOT_FOUND,
    NOT_FOUND,
    Progress,
    join_key,
    no_progress,
    not_found,
    validate_key,
)
from runtime.store.ranged import RangeAnswerError, RangedGetter, RangeTransferError
from sllm.errors import StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")

# S3 refuses multipart parts under 5 MiB (except the last) and more than 10,000 parts.
_MIN_PART = 5 << 20
_MAX_PARTS = 10_000
_RETRY_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}
# A presigned URL is made for one request and used at once; this only bounds a slow answer.
_PRESIGN_S = 900


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``."""
    if not url.startswith("s3://"):
        raise StoreError(f"not an S3 URL: {url!r} (expected s3://bucket/prefix)")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise StoreError(f"S3 URL {url!r} has no bucket name")
    return bucket, prefix.strip("/")


def make_client(
    endpoint: str | None,
    region: str,
    path_style: bool,
    concurrency: int,
    credentials: tuple[str, str] | None = None,
) -> Any:
    """A thread-safe boto3 S3 client; ``credentials`` (key id, secret) or boto3's chain."""
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=region,
        # Our retry loop bounds attempts; botocore's would multiply them.
        retries={"total_max_attempts": 1, "mode": "standard"},
        # One pooled connection per parallel request plus headroom for HEAD/LIST.
        max_pool_connections=max(10, concurrency * 2),
        connect_timeout=5,
        read_timeout=60,
        s3={"addressing_style": "path" if path_style else "auto"},
        # Presigned URLs too (read_range): botocore presigns with SigV2 unless told.
        signature_version="s3v4",
    )
    key_id, secret = credentials if credentials is not None else (None, None)
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        config=config,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
    )


class S3Store:
    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        concurrency: int = 8,
        part_size: int = 16 << 20,
        retries: int = 4,
        backoff_s: float = 0.2,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self._ranged = RangedGetter()
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._concurrency = concurrency
        self._part_size = part_size
        self.retries = retries
        self.backoff_s = backoff_s
        self._sleep = sleep

    @property
    def url(self) -> str:
        return f"s3://{join_key(self.bucket, self.prefix)}"

    @property
    def concurrency(self) -> int:
        return self._concurrency

    @property
    def part_size(self) -> int:
        return self._part_size

    def _obj(self, key: str) -> str:
        return join_key(self.prefix, validate_key(key))

    def describe(self, key: str) -> str:
        return f"s3://{join_key(self.bucket, self.prefix, key)}"

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one request with bounded retries; map failures to StoreError naming ``what``."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        last = ""
        for attempt in range(self.retries):
            try:
                return fn()
            except ClientError as exc:
                err = exc.response.get("Error", {})
                status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
                code, message = str(err.get("Code", "")), str(err.get("Message", ""))
                last = self._refused(what, code, message, status=status)
            except RangeAnswerError as exc:  # read_range's GET, answered by the server
                last = self._refused(what, *_error_document(exc.body), status=exc.status)
            except NoCredentialsError:
                raise StoreError(
                    f"{what}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                ) from None
            except BotoCoreError as exc:
                last = f"{type(exc).__name__}: {exc}"
            except RangeTransferError as exc:
                last = str(exc)
            if attempt + 1 < self.retries:
                delay = min(self.backoff_s * 2**attempt, 5.0)
                log.info("store retry %s attempt=%d cause=%s", what, attempt + 1, last)
                self._sleep(delay)
        raise StoreError(f"{what}: store unavailable after {self.retries} attempts ({last})")

    def _refused(self, what: str, code: str, message: str = "", *, status: int) -> str:
        """An S3 error answer (``code`` from its error document, may be empty): raises the
        StoreError that names it, unless trying again may help; then returns the cause."""
        if code == "NoSuchBucket":
            raise self._no_bucket(what) from None
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            raise self._missing(what) from None
        if code in _AUTH_CODES or status == 403:
            raise StoreError(
                f"{what}: access denied ({code or status}); check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY"
            ) from None
        if status < 500 and code not in _RETRY_CODES:
            raise StoreError(f"{what}: {code or status}: {message}") from None
        return f"HTTP {status} {code}".strip()

    def _no_bucket(self, what: str) -> StoreError:
        return StoreError(
            f"bucket {self.bucket!r} does not exist (while accessing {what})",
            code=BUCKET_NOT_FOUND,
            status=404,
        )

    def _missing(self, what: str) -> StoreError:
        """A 404 is a missing object unless the bucket itself is missing: say which."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            return self._no_bucket(what)
        except BotoCoreError:
            pass
        return not_found(what)

    def size(self, key: str) -> int:
        what = self.describe(key)
        head = self._call(
            what, lambda: self.client.head_object(Bucket=self.bucket, Key=self._obj(key))
        )
        return int(head["ContentLength"])

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except StoreError as exc:
            if exc.code == NOT_FOUND:
                return False
            raise
        return True

    def list(self, prefix: str) -> list[str]:
        base = join_key(self.prefix, prefix)
        full = f"{base}/" if base else ""

        def run() -> list[str]:
            keys: list[str] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            ):
                for obj in page.get("Contents", []):
                    keys.append(obj["Key"][len(self.prefix) + 1 if self.prefix else 0 :])
            return keys

        return sorted(self._call(f"s3://{join_key(self.bucket, base)}/", run))

    def read_range(self, key: str, offset: int, buf: memoryview) -> None:
        if len(buf) == 0:
            return
        what = self.describe(key)
        end = offset + len(buf) - 1
        params = {"Bucket": self.bucket, "Key": self._obj(key)}

        def run() -> None:
            url = self.client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=_PRESIGN_S
            )
            got = self._ranged.read_into(url, offset, buf)
            if got != len(buf):
                raise StoreError(
                    f"{what}: object ends at byte {offset + got}, expected at least {end + 1}"
                )

        self._call(f"{what} bytes {offset}-{end}", run)

    def get_bytes(self, key: str) -> bytes:
        def run() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=self._obj(key))["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
            return data

        return self._call(self.describe(key), run)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(
            self.describe(key),
            lambda: self.client.put_object(Bucket=self.bucket, Key=self._obj(key), Body=data),
        )

    def put_file(self, key: str, path: str, progress: Progress = no_progress) -> None:
        size = os.path.getsize(path)
        part = max(self._part_size, _MIN_PART, math.ceil(size / _MAX_PARTS))
        if size <= part:
            with open(path, "rb") as f:
                data = f.read()
            self.put_bytes(key, data)
            progress(size)
            return
        what = self.describe(key)
        obj = self._obj(key)
        upload = self._call(
            what, lambda: self.client.create_multipart_upload(Bucket=self.bucket, Key=obj)
        )
        upload_id = upload["UploadId"]
        fd = os.open(path, os.O_RDONLY)

        def send(number: int) -> dict[str, Any]:
            offset = (number - 1) * part
            data = os.pread(fd, min(part, size - offset), offset)
            resp = self._call(
                f"{what} part {number}",
                lambda: self.client.upload_part(
                    Bucket=self.bucket, Key=obj, UploadId=upload_id, PartNumber=number, Body=data
                ),
            )
            progress(len(data))
            return {"PartNumber": number, "ETag": resp["ETag"]}

        try:
            with ThreadPoolExecutor(self._concurrency, thread_name_prefix="s3-put") as pool:
                parts = list(pool.map(send, range(1, math.ceil(size / part) + 1)))
            self._call(
                what,
                lambda: self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=obj,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                ),
            )
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=obj, UploadId=upload_id)
            except Exception as exc:  # the original error matters more than the cleanup's
                log.warning("store abort-multipart-failed object=%s error=%s", what, exc)
            raise
        finally:
            os.close(fd)


def _error_document(body: bytes) -> tuple[str, str]:
    """(Code, Message) of an S3 error document; ("", the body's start) when it is not one."""
    try:
        doc = ET.fromstring(body)
    except ET.ParseError:
        return "", body[:200].decode("utf-8", "replace")
    return doc.findtext("Code") or "", doc.findtext("Message") or ""
