"""Start a ``ckptd serve`` process and wait until it answers (demo, ``exec``, tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

from .errors import DaemonUnavailableError


def socket_ready(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
        return True


class DaemonProcess:
    """A daemon child process; ``stop()`` sends SIGTERM and returns its exit code."""

    def __init__(
        self,
        root: str,
        socket_path: str,
        *,
        store: str | None = None,
        args: list[str] | None = None,
        log_path: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        cmd = [sys.executable, "-m", "ckptd", "serve", "--root", root, "--socket", socket_path]
        if store:
            cmd += ["--store", store]
        cmd += args or []
        self.socket = socket_path
        self.root = root
        self.log_path = log_path
        self._log = open(log_path, "ab") if log_path else None  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT if self._log else None,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not socket_ready(socket_path):
            if self.proc.poll() is not None:
                raise DaemonUnavailableError(
                    f"ckptd serve exited with {self.proc.returncode} before listening"
                    + (f"; see {log_path}" if log_path else "")
                )
            if time.monotonic() > deadline:
                self.kill()
                raise DaemonUnavailableError(
                    f"ckptd serve did not listen on {socket_path} in {timeout} s"
                )
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 120.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._close_log()

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
