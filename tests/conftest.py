"""Shared fixtures: a real ``ckptd serve`` process per test, on a short socket path."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from ckptd.spawn import DaemonProcess
from tests.servers import (
    any_s3_bucket,
    gcs_bucket,
    gcs_proxy,
    gcs_server,
    s3_bucket,
    s3_proxy,
    s3_server,
    s3rver_bucket,
    s3rver_proxy,
    s3rver_server,
)

# Test daemons never probe cloud metadata addresses (only 127.0.0.1 is reachable from tests).
os.environ.setdefault("CKPTD_PREEMPTION", "off")

__all__ = [
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
]


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


# ---- the fault report: every fault test records what it injected and what was lost -------------

_FAULTS: list[tuple[str, str, int, int, int]] = []


@pytest.fixture
def fault_log(request):  # type: ignore[no-untyped-def]
    """``fault_log(fault, injected, saved, lost)``; the session prints them as a markdown table."""

    def record(fault: str, injected: int, saved: int, lost: int) -> None:
        _FAULTS.append((request.node.nodeid.split("::")[0], fault, injected, saved, lost))

    return record


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if not _FAULTS:
        return
    lines = [
        "| test file | fault injected | times | checkpoints committed | checkpoints lost |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {f} | {fault} | {n} | {saved} | {lost} |" for f, fault, n, saved, lost in _FAULTS]
    total = sum(x[4] for x in _FAULTS)
    lines.append(
        f"| **total** | {len(_FAULTS)} scenarios | | {sum(x[3] for x in _FAULTS)} | {total} |"
    )
    terminalreporter.write_sep("=", "faults injected and checkpoints lost")
    for line in lines:
        terminalreporter.write_line(line)
    if out := os.environ.get("CKPTD_FAULT_REPORT"):
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")
