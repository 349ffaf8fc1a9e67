"""Object stores behind one small protocol, built from a URL by ``open_store``."""

from __future__ import annotations

import os
from urllib.parse import urlparse

from ..errors import ConfigError
from .base import ObjectInfo, ProgressFn, Store, join_key
from .options import StoreOptions, url_options

__all__ = ["ObjectInfo", "ProgressFn", "Store", "is_local", "join_key", "local_path", "open_store"]


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """The filesystem path of a local store URL (a path or ``file:///abs/path``)."""
    if url.startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"file URL {url!r} names a host; use file:///absolute/path")
        return os.path.abspath(parsed.path)
    return os.path.abspath(os.path.expanduser(url))


def split_bucket(url: str) -> tuple[str, str, str]:
    """``s3://bucket/prefix`` -> ("s3", "bucket", "prefix")."""
    parsed = urlparse(url)
    if not parsed.netloc:
        raise ConfigError(
            f"store URL {url!r} has no bucket: expected {parsed.scheme}://BUCKET/PREFIX"
        )
    return parsed.scheme, parsed.netloc, parsed.path.strip("/")


def open_store(url: str, options: StoreOptions | None = None) -> Store:
    """Build the backend for ``url``. Does no network I/O. ``options`` (encryption, storage
    class) apply to S3 and GCS stores; a local root ignores them."""
    if not url:
        raise ConfigError("empty store URL")
    if is_local(url):
        from .local import LocalStore

        return LocalStore(local_path(url))
    scheme = url.split("://", 1)[0].lower()
    if scheme == "s3":
        from .s3 import S3Store

        _, bucket, prefix = split_bucket(url)
        return S3Store(bucket, prefix, options=url_options(url, options))
    if scheme in ("gs", "gcs"):
        from .gcs import GCSStore

        _, bucket, prefix = split_bucket(url)
        return GCSStore(bucket, prefix, options=url_options(url, options))
    if scheme == "memory":
        from .memory import MemoryStore

        return MemoryStore(url)
    raise ConfigError(
        f"unknown store URL scheme {scheme!r} in {url!r}: use a path, file:///abs/path, "
        "s3://bucket/prefix or gs://bucket/prefix"
    )
