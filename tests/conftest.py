"""Shared fixtures: a real ``ckptd serve`` process per test, on a short socket path."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from ckptd.spawn import DaemonProcess
from tests.servers import gcs_bucket, gcs_proxy, gcs_server, s3_bucket, s3_proxy, s3_server

# Test daemons never probe cloud metadata addresses (only 127.0.0.1 is reachable from tests).
os.environ.setdefault("CKPTD_PREEMPTION", "off")

__all__ = ["gcs_bucket", "gcs_proxy", "gcs_server", "s3_bucket", "s3_proxy", "s3_server"]


class DaemonHandle:
    """A running daemon child with its root and socket; restartable, always cleaned up."""

    def __init__(self, root: str, sock: str, log: str, store: str | None, args: list[str]) -> None:
        self.root, self.socket, self.log, self.store, self.args = root, sock, log, store, args
        self.proc: DaemonProcess | None = None
        self.start()

    def start(self, env: dict[str, str] | None = None) -> None:
        self.proc = DaemonProcess(
            self.root, self.socket, store=self.store, args=self.args, log_path=self.log, env=env
        )

    def stop(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.stop(timeout)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()

    def restart(self) -> None:
        self.kill()
        self.start()

    def log_text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A short directory: AF_UNIX socket paths must stay under 108 bytes."""
    d = tempfile.mkdtemp(prefix="ckptd-t-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_daemon(short_dir: str, tmp_path) -> Iterator:  # type: ignore[no-untyped-def]
    started: list[DaemonHandle] = []

    def make(
        root: str | None = None,
        store: str | None = None,
        args: list[str] | None = None,
        name: str = "d",
    ) -> DaemonHandle:
        h = DaemonHandle(
            root or str(tmp_path / f"root-{name}"),
            os.path.join(short_dir, f"{name}.sock"),
            str(tmp_path / f"{name}.log"),
            store,
            args or [],
        )
        started.append(h)
        return h

    yield make
    for h in started:
        h.kill()


@pytest.fixture
def daemon(make_daemon) -> DaemonHandle:  # type: ignore[no-untyped-def]
    return make_daemon()
