"""``ckptd status --watch`` in a real pseudo-terminal, beside a real daemon uploading to the S3
server through a throttled proxy: the frames redraw in place, keep the header on top, fit the
rows and columns set on the terminal, show the upload's rate and ETA, and Ctrl-C exits 0; a
daemon that restarts under the watch is waited for."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable

import pytest
import torch

from ckptd import Checkpointer

ROWS, COLS = 14, 92
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _controlling_tty() -> None:
    """In the child, after setsid: make the pty its terminal, so that ^C there is SIGINT. A
    suite started in the background by a shell without job control inherits SIGINT ignored
    (POSIX), and Python then installs no KeyboardInterrupt handler: restore the default, as a
    terminal's shell would for a foreground command."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _frames(raw: str) -> list[list[str]]:
    """Each complete frame (cursor home ... clear to end) as its screen lines."""
    out = []
    for chunk in raw.split("\x1b[H")[1:]:
        if "\x1b[J" not in chunk:
            continue  # still being written
        body = chunk.split("\x1b[J")[0]
        lines = _ANSI.sub("", body).replace("\r", "").split("\n")
        out.append(lines[:-1] if lines and lines[-1] == "" else lines)
    return out


def _spawn_watch(
    sock: str, rows: int = ROWS, cols: int = COLS
) -> tuple[subprocess.Popen[bytes], int]:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptd", "status", "--watch", "--interval", "0.2", "--socket", sock],
        stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
        preexec_fn=_controlling_tty,  # the test's own child
    )  # fmt: skip
    os.close(slave)
    return proc, master


class _Screen:
    """What the child wrote to the terminal so far."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.raw = ""

    def read_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            ready, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if ready:
                try:
                    self.raw += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    return

    def until(self, cond: Callable[[list[str]], bool], timeout: float) -> list[str]:
        """Read until the newest complete frame satisfies ``cond``; that frame."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read_for(0.2)
            frames = _frames(self.raw)
            if frames and cond(frames[-1]):
                return frames[-1]
        raise AssertionError(f"no such frame in {timeout} s; last: {_frames(self.raw)[-1:]}")


def test_watch_waits_for_a_restarted_daemon(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon()
    proc, master = _spawn_watch(d.socket)
    screen = _Screen(master)
    try:
        first = screen.until(lambda f: f[0].startswith("ckptd "), 30)
        assert f"pid {d.proc.pid}" in first[0] and "no checkpoints yet" in first
        d.kill()
        gone = screen.until(lambda f: "not answering" in f[0], 30)
        assert len(gone) == 1 and d.socket in gone[0]
        d.start()
        back = screen.until(lambda f: f"pid {d.proc.pid}" in f[0], 30)
        assert back[0].startswith("ckptd ")
        assert proc.poll() is None  # the watch went on through the restart
        os.write(master, b"\x03")
        assert proc.wait(timeout=30) == 0
        screen.read_for(0.3)
        assert screen.raw.endswith("\x1b[?25h")  # the cursor is shown again
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        os.close(master)


@pytest.mark.slow
def test_watch_in_a_pty_during_an_upload(s3_bucket, s3_proxy, make_daemon) -> None:  # type: ignore[no-untyped-def]
    # One file at a time, so that progress (counted per file here) moves during the upload.
    d = make_daemon(store=f"s3://{s3_bucket}/w", args=["--file-concurrency", "1"])
    proc, master = _spawn_watch(d.socket)
    screen = _Screen(master)
    name = "watch/run@step-00000001"

    def uploading(frame: list[str]) -> bool:
        line = next((x for x in frame if name in x), "")
        return "uploading" in line and "MiB/s" in line and "ETA" in line

    try:
        s3_proxy.limit_bandwidth(4 << 20)  # 12 files of 2 MiB at 4 MiB/s: ~6 s of upload
        with Checkpointer("watch/run", socket=d.socket) as ckpt:
            models = {f"m{i:02d}": torch.nn.Linear(1024, 512, bias=False) for i in range(12)}
            h = ckpt.save(1, models=models)
            mid = screen.until(uploading, 90)
            s3_proxy.limit_bandwidth(None)
            h.wait("uploaded", timeout=120)
            screen.until(lambda f: _done([f]), 30)
        os.write(master, b"\x03")  # Ctrl-C on the terminal
        assert proc.wait(timeout=30) == 0
        screen.read_for(0.3)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        os.close(master)
    frames = _frames(screen.raw)
    assert len(frames) >= 3, screen.raw[-2000:]
    for frame in frames:
        assert len(frame) <= ROWS - 1, frame  # one row spare: nothing scrolls
        assert all(len(line) < COLS for line in frame), frame
        assert frame[0].startswith("ckptd ") and f"pid {d.proc.pid}" in frame[0], frame
        assert "clients 1" in frame[0] or "clients 0" in frame[0], frame
    assert "store s3://" in mid[1] and "in progress:" in mid
    print("\n".join(mid))  # the screen mid-upload, for the record (pytest -s shows it)


def _done(frames: list[list[str]]) -> bool:
    return bool(frames) and any(
        "watch/run@step-00000001" in x and "uploaded" in x for x in frames[-1]
    )
