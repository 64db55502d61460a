"""The model store: ``open_store(settings)`` picks the adapter from the store URL."""

from __future__ import annotations

from pathlib import Path

from runtime.store.base import Progress, Store, join_key
from runtime.store.local import LocalStore
from runtime.store.s3 import S3Store, make_client, parse_s3_url
from sllm.settings import StoreSettings

__all__ = ["LocalStore", "Progress", "S3Store", "Store", "join_key", "open_store"]


def open_store(settings: StoreSettings) -> Store:
    """``s3://bucket/prefix`` -> ``S3Store``; anything else is a local directory."""
    if settings.url.startswith("s3://"):
        bucket, prefix = parse_s3_url(settings.url)
        credentials = None
        if settings.access_key_id and settings.secret_access_key:
            credentials = (settings.access_key_id, settings.secret_access_key)
        client = make_client(
            settings.s3_endpoint,
            settings.s3_region,
            settings.s3_path_style,
            settings.concurrency,
            credentials,
        )
        return S3Store(
            client,
            bucket,
            prefix,
            concurrency=settings.concurrency,
            part_size=settings.part_size,
            retries=settings.retries,
        )
    return LocalStore(
        Path(settings.url).expanduser(),
        concurrency=min(settings.concurrency, 4),
        part_size=settings.part_size,
    )
