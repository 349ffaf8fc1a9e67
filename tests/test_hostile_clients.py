"""Hostile or careless clients and local users, against the real daemon process.

Each case ends in a clear error for the one at fault and nothing lost for anyone else: a client
that shrinks its slot, a client that never reads its replies, half-sent frames, running out of
descriptors, a second trainer on one run, another local user at the socket path.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import msgpack
import pytest

import ckptd
from ckptd import Checkpointer
from ckptd.header import encode_header
from ckptd.protocol import encode
from ckptd.spawn import socket_ready
from tests.helpers import Net, until


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def _events(s: socket.socket, want: str, timeout: float = 20) -> list[dict]:  # type: ignore[type-arg]
    """Read frames until one has ``ev == want`` (or EOF); returns all read."""
    s.settimeout(timeout)
    buf, out = b"", []
    while True:
        try:
            chunk = s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            return out
        if not chunk:
            return out
        buf += chunk
        while len(buf) >= 4 and len(buf) >= 4 + (n := int.from_bytes(buf[:4], "big")):
            out.append(msgpack.unpackb(buf[4 : 4 + n], raw=False))
            buf = buf[4 + n :]
            if out[-1].get("ev") == want:
                return out


def _honest_save(sock: str, run: str = "bystander") -> None:
    with Checkpointer(run, socket=sock) as ckpt:
        ckpt.save(1, model=Net()).wait(timeout=30)


def test_a_slot_that_shrinks_fails_that_save_and_nothing_else(daemon, fault_log) -> None:  # type: ignore[no-untyped-def]
    """Before: the daemon mapped the slot and died of SIGBUS, taking every client's pending
    checkpoint with it. Now it reads with pread: only the shrinking client's save fails."""
    size = 8 << 20
    fd = os.memfd_create("slot")
    os.ftruncate(fd, size)
    s = _raw(daemon.socket)
    socket.send_fds(s, [encode({"op": "slot", "slot": 0, "size": size, "generation": 1})], [fd])
    s.sendall(encode({"op": "status", "rid": 1}))
    assert _events(s, "status")  # the daemon holds the slot now
    os.ftruncate(fd, 0)  # the client takes its memory back before the daemon reads it
    header = encode_header({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}})
    s.sendall(encode({"op": "save", "id": 7, "run": "shrinker", "tag": "t", "step": 1, "slot": 0,
                      "generation": 1,
                      "files": [{"name": "model.weights.safetensors", "header": header,
                                 "offset": 0, "size": size}]}))  # fmt: skip
    events = _events(s, "failed")
    s.close()
    os.close(fd)
    assert events and events[-1]["ev"] == "failed" and "shrank" in events[-1]["error"], events
    assert daemon.proc.proc.poll() is None, daemon.log_text()
    _honest_save(daemon.socket)
    assert not os.path.exists(os.path.join(daemon.root, "shrinker", "checkpoints", "t"))
    fault_log("hostile client: slot shrunk during the write", 1, 1, 0)


def test_a_refused_hello_is_answered(daemon) -> None:  # type: ignore[no-untyped-def]
    """Before: an invalid name in hello dropped the connection with no word."""
    s = _raw(daemon.socket)
    s.sendall(encode({"op": "hello", "rid": 1, "run": "a/../../b", "pid": 1}))
    events = _events(s, "error")
    s.close()
    assert events and events[-1]["ev"] == "error" and events[-1]["rid"] == 1
    assert "invalid run" in events[-1]["error"]
    _honest_save(daemon.socket)


def test_clients_that_never_read_do_not_hold_up_an_honest_save(daemon, fault_log) -> None:  # type: ignore[no-untyped-def]
    """Two clients flood status requests and never read the replies; an honest client's saves
    go through meanwhile, and the flooders are dropped within a bounded time."""
    flooders = []
    for _ in range(2):
        s = _raw(daemon.socket)
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
    _honest_save(daemon.socket)
    pid = daemon.proc.pid
    before = _rss_kib(pid)
    chunk = b"\x00" * (1 << 20)
    stalled = []
    for _ in range(5):
        s = _raw(daemon.socket)
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
    _honest_save(daemon.socket, run="after")
    fault_log("hostile client: five half-sent 60 MiB frames", 5, 1, 0)


def test_a_second_live_writer_on_a_run_is_refused_naming_the_holder(daemon) -> None:  # type: ignore[no-untyped-def]
    """Before: two trainers on one run both exited 0 while half the saves were dropped."""
    with Checkpointer("shared", socket=daemon.socket) as first:
        first.save(1, model=Net()).wait(timeout=30)
        second = Checkpointer("shared", socket=daemon.socket)
        with pytest.raises(ckptd.SaveError, match="live writer"):
            second.save(2, model=Net()).wait(timeout=30)
        first.save(3, model=Net()).wait(timeout=30)
        refused = second.save(4, model=Net())  # nobody waits on this one...
        until(lambda: refused.state == "failed", 30, "the refusal")
        with pytest.raises(ckptd.SaveError, match=f"pid {os.getpid()}"):
            second.save(5, model=Net())  # ...so the next save raises it, not only close()
        second._closed = True  # its failures were reported; nothing of it is pending
        second._conn.close()  # type: ignore[union-attr]
    with Checkpointer("shared", socket=daemon.socket) as third:  # the run is free again
        third.save(6, model=Net()).wait(timeout=30)
    tags = [c["tag"] for c in ckptd.list_checkpoints(os.path.join(daemon.root, "shared"))]
    assert sorted(tags) == ["step-00000001", "step-00000003", "step-00000006"]


def test_an_unreported_failure_raises_at_the_next_save(daemon) -> None:  # type: ignore[no-untyped-def]
    with Checkpointer("twice", socket=daemon.socket) as ckpt:
        ckpt.save(1, model=Net(), tag="fixed").wait(timeout=30)
        ckpt.save(2, model=Net(), tag="fixed")  # collides; nobody waits on it
        until(lambda: bool(ckpt._unreported), 30, "the collision to come back")
        with pytest.raises(ckptd.SaveError, match="already exists"):
            ckpt.save(3, model=Net())
        ckpt.save(4, model=Net()).wait(timeout=30)  # reported once, then saving goes on


def test_socket_directory_of_another_user_is_refused(tmp_path, short_dir) -> None:  # type: ignore[no-untyped-def]
    """Before: a directory another user pre-created made the daemon serve there, where that
    user could swap the socket for their own and read every save."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory owned by another user")
    evil = os.path.join(short_dir, "evil")
    os.mkdir(evil, 0o755)
    os.chown(evil, 12345, 12345)
    proc = subprocess.run(
        [sys.executable, "-m", "ckptd", "serve", "--root", str(tmp_path / "root"),
         "--socket", os.path.join(evil, "ckptd.sock")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "belongs to uid 12345" in proc.stderr
    assert not os.path.exists(os.path.join(evil, "ckptd.sock"))


def test_world_writable_socket_directory_is_refused(tmp_path, short_dir) -> None:  # type: ignore[no-untyped-def]
    shared = os.path.join(short_dir, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o777)
    proc = subprocess.run(
        [sys.executable, "-m", "ckptd", "serve", "--root", str(tmp_path / "root"),
         "--socket", os.path.join(shared, "ckptd.sock")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "writable by other users" in proc.stderr


_FAKE_DAEMON = """
import os, socket, sys
os.setgid(12345); os.setuid(12345)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1]); s.listen(4)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.recv(1 << 20)
"""


def test_client_refuses_a_daemon_of_another_user() -> None:  # type: ignore[no-untyped-def]
    """The client checks who is at the socket (SO_PEERCRED) before it sends a byte."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another user")
    d = tempfile.mkdtemp(prefix="ckptd-t-", dir="/tmp")  # the other user must reach it
    os.chmod(d, 0o777)
    path = os.path.join(d, "fake.sock")
    fake = subprocess.Popen([sys.executable, "-c", _FAKE_DAEMON, path], stdout=subprocess.PIPE)
    try:
        assert fake.stdout is not None and fake.stdout.readline().strip() == b"ready"
        with pytest.raises(ckptd.DaemonUnavailableError, match="runs as uid 12345"):
            Checkpointer("victim", socket=path)
    finally:
        fake.kill()
        fake.wait()
        shutil.rmtree(d, ignore_errors=True)


def test_files_and_root_are_owner_only(daemon) -> None:  # type: ignore[no-untyped-def]
    _honest_save(daemon.socket, run="private")
    ck = os.path.join(daemon.root, "private", "checkpoints", "step-00000001")
    for name in os.listdir(ck):
        assert os.stat(os.path.join(ck, name)).st_mode & 0o077 == 0, name
    assert os.stat(ck).st_mode & 0o077 == 0


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
                hogs.append(_raw(sock))
            except OSError:
                break
        until(lambda: b"cannot accept a client" in log_path.read_bytes(), 30, "EMFILE")
        for s in hogs:
            s.close()
        _honest_save(sock)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    fault_log("exhaustion: descriptors run out at accept", 1, 1, 0)


def test_a_restarted_daemon_costs_a_live_trainer_at_most_its_in_flight_saves(daemon) -> None:  # type: ignore[no-untyped-def]
    """The daemon restarts (systemd after a crash) under a training loop: the loop is not
    crashed; its next save reconnects and commits."""
    with Checkpointer("live", socket=daemon.socket) as ckpt:
        ckpt.save(1, model=Net()).wait(timeout=30)
        daemon.restart()
        until(lambda: socket_ready(daemon.socket), 60, "the restarted daemon")
        until(lambda: not ckpt._conn.alive, 30, "the client to see the old daemon go")  # type: ignore[union-attr]
        ckpt.save(2, model=Net()).wait(timeout=30)
    tags = [c["tag"] for c in ckptd.list_checkpoints(os.path.join(daemon.root, "live"))]
    assert tags == ["step-00000001", "step-00000002"]
