"""systemd's notify protocol, checked against a real daemon process and a socket playing systemd."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from ckptd.daemon import sdnotify
from ckptd.spawn import DaemonProcess

BOUND_S = 20.0


class NotifySocket:
    """A bound SOCK_DGRAM socket that collects the fields of every datagram, like systemd does."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.fields: list[str] = []

    def wait_for(self, prefix: str, timeout: float = BOUND_S) -> str:
        """Receive until a field starting with ``prefix`` arrives; recv timeouts, not sleeps."""
        deadline = time.monotonic() + timeout
        while True:
            for f in self.fields:
                if f.startswith(prefix):
                    return f
            left = deadline - time.monotonic()
            assert left > 0, f"no {prefix!r} within {timeout} s; got {self.fields}"
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.fields += data.decode().split("\n")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(short_dir: str) -> Iterator[tuple[str, NotifySocket]]:
    path = os.path.join(short_dir, "notify")
    ns = NotifySocket(path)
    yield path, ns
    ns.close()


def test_daemon_speaks_the_notify_protocol(
    notify_socket: tuple[str, NotifySocket], short_dir: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    path, ns = notify_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}
    log = str(tmp_path / "d.log")
    proc = DaemonProcess(
        str(tmp_path / "root"), os.path.join(short_dir, "d.sock"), env=env, log_path=log
    )
    try:
        assert ns.wait_for("READY=1") == "READY=1"
        assert ns.wait_for("STATUS=").startswith("STATUS=serving")
        ns.wait_for("WATCHDOG=1")
        ns.fields.clear()
        ns.wait_for("WATCHDOG=1", timeout=5)  # repeated: WATCHDOG_USEC / 2 = every second
        code = proc.stop(60)
        ns.wait_for("STOPPING=1", timeout=5)
        # Sent at once on stop, so systemd's stop timer covers the whole drain (default 80 s).
        usec = int(ns.wait_for("EXTEND_TIMEOUT_USEC=", timeout=5).split("=", 1)[1])
        assert usec >= 80_000_000
        with open(log) as f:
            assert code == 0, f.read()
    finally:
        proc.kill()


def test_notify_without_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False


def test_notify_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"@ckptd-test-{uuid.uuid4().hex}"
    ns = NotifySocket(name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        assert sdnotify.notify("READY=1", "STATUS=ok") is True
        assert ns.wait_for("READY=1", timeout=5) == "READY=1"
        assert "STATUS=ok" in ns.fields
    finally:
        ns.close()


def test_notify_to_a_dead_socket_warns_and_returns_false(
    monkeypatch: pytest.MonkeyPatch, short_dir: str
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(short_dir, "nobody"))
    assert sdnotify.notify("WATCHDOG=1") is False


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == 1.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 1.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert sdnotify.watchdog_interval() is None
