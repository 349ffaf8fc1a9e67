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

from ckptd.storage.capabilities import FULL_OBJECT, Capabilities
from ckptd.testing.servers import (
    S3_ENV,
    S3RVER_ENV,
    bucket_name,
    create_gcs_bucket,
    s3rver_binary,
    start_fake_gcs,
    start_moto,
    start_s3rver,
)
from tests.faultproxy import FaultProxy

MOTO_CAPABILITIES = Capabilities(
    verifies_checksums=False, reports_checksums=False, verifies_md5=False, etag_is_md5=True,
    create_only=True, list_parts=True, list_uploads=True, abort_uploads=True,
    multipart_checksum=FULL_OBJECT,
)  # fmt: skip
"""What probing moto finds (tests/test_s3_compat.py checks it): stores that fault tests build
take it as given, so that the probe's own requests do not eat the faults they inject."""

S3RVER_CAPABILITIES = Capabilities(
    verifies_checksums=False, reports_checksums=False, verifies_md5=False, etag_is_md5=True,
    create_only=False, list_parts=False, list_uploads=False, abort_uploads=False,
    multipart_checksum=FULL_OBJECT,
)  # fmt: skip
"""What probing s3rver 3.7.1 finds (it takes any checksum parameters and ignores them)."""


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


@pytest.fixture(scope="session")
def s3rver_server() -> Iterator[str]:
    """s3rver (npm) in its own process, the second S3 implementation; yields its endpoint URL.
    Skips only where node or the package is absent (``./dev test`` installs it)."""
    if s3rver_binary() is None:
        pytest.skip("s3rver not installed (./dev test installs it with npm into .node/)")
    with tempfile.TemporaryDirectory(prefix="ckptd-s3rver-") as d, start_s3rver(d) as server:
        yield server.url


def set_s3_env(
    monkeypatch: pytest.MonkeyPatch, endpoint: str, env: dict[str, str] | None = None
) -> None:
    """Point botocore at ``endpoint`` with dummy credentials, through its own env conventions."""
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    for var, value in (env or S3_ENV).items():
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
def s3rver_bucket(s3rver_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket on s3rver; the env points botocore (and daemons) at it."""
    import boto3

    set_s3_env(monkeypatch, s3rver_server, S3RVER_ENV)
    name = bucket_name()
    # A session of its own: boto3's default one keeps the credentials it first saw (moto's).
    client = boto3.session.Session().client("s3", endpoint_url=s3rver_server)
    client.create_bucket(Bucket=name)
    yield name
    client.close()


@pytest.fixture(params=["moto", "s3rver"])
def any_s3_bucket(request: pytest.FixtureRequest) -> str:
    """A fresh bucket on each S3 implementation in turn (moto, then s3rver)."""
    return str(request.getfixturevalue("s3_bucket" if request.param == "moto" else "s3rver_bucket"))


@pytest.fixture
def s3rver_proxy(
    s3rver_bucket: str, s3rver_server: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FaultProxy]:
    """A fault proxy in front of s3rver; ``AWS_ENDPOINT_URL`` points at the proxy."""
    yield from _proxied(s3rver_server, "AWS_ENDPOINT_URL", monkeypatch)


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
    "MOTO_CAPABILITIES",
    "S3RVER_CAPABILITIES",
    "any_s3_bucket",
    "gcs_bucket",
    "gcs_proxy",
    "gcs_server",
    "s3_bucket",
    "s3_proxy",
    "s3_server",
    "s3rver_bucket",
    "s3rver_proxy",
    "s3rver_server",
    "set_s3_env",
]
