"""Exhaustion: descriptors, memory held by unfinished messages, and clients that never read.

None of them may stop the daemon or an honest client's save: each is bounded, logged, and costs
only the client that caused it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from ckptd import Checkpointer
from ckptd.protocol import encode
from ckptd.spawn import socket_ready
from tests.clientkit import honest_save, raw_socket
from tests.helpers import Net, until


def test_clients_that_never_read_do_not_hold_up_anhonest_save(daemon, fault_log) -> None:  # type: ignore[no-untyped-def]
    """Two clients flood status requests and never read the replies; an honest client's saves
    go through meanwhile, and the flooders are dropped within a bounded time."""
    flooders = []
    for _ in range(2):
        s = raw_socket(daemon.socket)
        s.setblocking(False)
        flooders.append(s)
    frame = encode({"op": "status"})
    for s in flooders:
        for _ in range(3000):
            try:
                s.send(frame)
            except BlockingIOError:
                break
    t0 = time.monotonic()
    with Checkpointer("honest", socket=daemon.socket) as ckpt:
        for step in range(3):
            ckpt.save(step, model=Net()).wait(timeout=30)
    took = time.monotonic() - t0
    assert took < 10, f"honest saves took {took:.1f} s"
    for s in flooders:
        s.close()
    assert daemon.proc.proc.poll() is None
    fault_log("hostile client: two clients never read their replies", 2, 3, 0)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_half_sent_frames_cannot_grow_the_daemon_without_bound(daemon, fault_log) -> None:  # type: ignore[no-untyped-def]
    """Five clients each start a 60 MiB frame and stall. Before: +300 MiB of daemon memory.
    Now the unfinished bytes across all clients are capped and the excess clients dropped."""
    honest_save(daemon.socket)
    pid = daemon.proc.pid
    before = _rss_kib(pid)
    chunk = b"\x00" * (1 << 20)
    stalled = []
    for _ in range(5):
        s = raw_socket(daemon.socket)
        s.settimeout(5)
        try:
            s.sendall((60 << 20).to_bytes(4, "big"))
            for _ in range(50):
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # dropped by the daemon: what we want
        stalled.append(s)
    grown_mib = (_rss_kib(pid) - before) / 1024
    for s in stalled:
        s.close()
    assert grown_mib < 200, f"the daemon grew by {grown_mib:.0f} MiB"
    honest_save(daemon.socket, run="after")
    fault_log("hostile client: five half-sent 60 MiB frames", 5, 1, 0)


def test_running_out_of_descriptors_is_survived(tmp_path, short_dir, fault_log) -> None:  # type: ignore[no-untyped-def]
    """Before: one EMFILE killed the accept loop for good while the watchdog kept pinging."""
    sock = os.path.join(short_dir, "fd.sock")
    log_path = tmp_path / "fd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["prlimit", "--nofile=64:64", sys.executable, "-m", "ckptd", "serve",
             "--root", str(tmp_path / "root"), "--socket", sock],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        until(lambda: socket_ready(sock), 60, "the daemon to listen")
        hogs = []
        for _ in range(100):
            try:
                hogs.append(raw_socket(sock))
            except OSError:
                break
        until(lambda: b"cannot accept a client" in log_path.read_bytes(), 30, "EMFILE")
        for s in hogs:
            s.close()
        honest_save(sock)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    fault_log("exhaustion: descriptors run out at accept", 1, 1, 0)
