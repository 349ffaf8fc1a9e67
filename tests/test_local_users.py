"""Other local users: the socket directory, the peer at the socket, and who can read the files.

Another user who pre-creates the socket directory (or can write to it) could replace the socket
with their own and read every weight byte; the daemon refuses such a directory, the client
checks who it talks to before it sends a byte, and what the daemon writes is owner-only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

import ckptd
from ckptd import Checkpointer
from tests.clientkit import honest_save


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
    honest_save(daemon.socket, run="private")
    ck = os.path.join(daemon.root, "private", "checkpoints", "step-00000001")
    for name in os.listdir(ck):
        assert os.stat(os.path.join(ck, name)).st_mode & 0o077 == 0, name
    assert os.stat(ck).st_mode & 0o077 == 0
