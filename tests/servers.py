"""Pytest fixtures over the loopback S3 and GCS servers of ``ckptd.testing.servers``.

Session-scoped fixtures start each server once (moto_server, fake-gcs-server) with its log in a
temporary dir removed at the end. Function-scoped fixtures give each test a fresh bucket and point
the clients at the server through the clients' own environment conventions
(``AWS_ENDPOINT_URL``... and ``STORAGE_EMULATOR_HOST``), via monkeypatch.

Use from a conftest: ``from tests.servers import s3_server, s3_bucket, ...``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest

from ckptd.testing.servers import (
    S3_ENV,
    bucket_name,
    create_gcs_bucket,
    start_fake_gcs,
    start_moto,
)
from tests.faultproxy import FaultProxy


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto_server in its own process; yields its endpoint URL."""
    with tempfile.TemporaryDirectory(prefix="ckptd-moto-") as d, start_moto(d) as server:
        yield server.url


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[str]:
    """fake-gcs-server (HTTP, in-memory backend) in its own process; yields the emulator host
    URL (``http://127.0.0.1:PORT``), the value for ``STORAGE_EMULATOR_HOST``."""
    with tempfile.TemporaryDirectory(prefix="ckptd-gcs-") as d, start_fake_gcs(d) as server:
        yield server.url


def set_s3_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point botocore at ``endpoint`` with dummy credentials, through its own env conventions."""
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    for var, value in S3_ENV.items():
        monkeypatch.setenv(var, value)


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket on the moto server; the env points botocore at it. Yields the name."""
    import boto3

    set_s3_env(monkeypatch, s3_server)
    name = bucket_name()
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=name)
    yield name
    client.close()


@pytest.fixture
def gcs_bucket(gcs_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on fake-gcs-server; ``STORAGE_EMULATOR_HOST`` points at it."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server)
    name = bucket_name()
    create_gcs_bucket(gcs_server, name)
    return name


def _proxied(server: str, var: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """A fault proxy in front of ``server``, with the client's env ``var`` pointing at it."""
    parsed = urlparse(server)
    with FaultProxy(parsed.hostname or "127.0.0.1", int(parsed.port or 80)) as proxy:
        monkeypatch.setenv(var, proxy.url)
        yield proxy


@pytest.fixture
def s3_proxy(
    s3_bucket: str, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FaultProxy]:
    """A fault proxy in front of moto; ``AWS_ENDPOINT_URL`` points at the proxy."""
    yield from _proxied(s3_server, "AWS_ENDPOINT_URL", monkeypatch)


@pytest.fixture
def gcs_proxy(
    gcs_bucket: str, gcs_server: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FaultProxy]:
    """A fault proxy in front of fake-gcs-server; ``STORAGE_EMULATOR_HOST`` points at it."""
    yield from _proxied(gcs_server, "STORAGE_EMULATOR_HOST", monkeypatch)


__all__ = [
    "gcs_bucket",
    "gcs_proxy",
    "gcs_server",
    "s3_bucket",
    "s3_proxy",
    "s3_server",
    "set_s3_env",
]
