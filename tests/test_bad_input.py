"""Bad input gets a clear error and loses nothing: dead daemons, hostile clients, torn files."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time

import msgpack
import pytest
import torch

import ckptd
from ckptd import Checkpointer
from ckptd.protocol import encode
from ckptd.spawn import DaemonProcess
from tests.clientkit import raw_socket
from tests.helpers import Net, bitwise_equal


def _alive_and_serving(daemon, run: str = "probe") -> None:  # type: ignore[no-untyped-def]
    assert daemon.proc.proc.poll() is None, daemon.log_text()
    with Checkpointer(run, socket=daemon.socket) as ckpt:
        ckpt.save(1, model=torch.nn.Linear(3, 3)).wait(timeout=30)


def _drain_replies(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


def test_no_daemon_names_the_socket(short_dir: str) -> None:
    path = os.path.join(short_dir, "nobody.sock")
    with pytest.raises(ckptd.DaemonUnavailableError) as info:
        Checkpointer("r", socket=path)
    assert path in str(info.value) and "ckptd serve" in str(info.value)


def test_socket_is_owner_only(daemon) -> None:  # type: ignore[no-untyped-def]
    assert os.stat(daemon.socket).st_mode & 0o777 == 0o600


def _memfd(size: int) -> int:
    fd = os.memfd_create("fuzz")
    os.ftruncate(fd, size)
    return fd


HOSTILE = [
    ("not msgpack", b"\x00\x00\x00\x05hello"),
    ("a declared 4 GiB frame", b"\xff\xff\xff\xff"),
    ("op of the wrong type", encode({"op": 3})),
    ("unknown op", encode({"op": "nope"})),
    ("save with no files",
     encode({"op": "save", "id": 1, "run": "r", "tag": "t", "step": 1, "files": [], "inline": {}})),
    ("run ../../etc (path traversal)",
     encode({"op": "save", "id": 1, "run": "../../etc", "tag": "t", "step": 1, "files": []})),
    ("tag /abs (absolute path)",
     encode({"op": "save", "id": 1, "run": "r", "tag": "/abs", "step": 1, "files": []})),
    ("tag with a NUL byte",
     encode({"op": "save", "id": 1, "run": "r", "tag": "t\x00x", "step": 1, "files": []})),
    ("save naming a slot never sent",
     encode({"op": "save", "id": 1, "run": "r", "tag": "t", "step": 1, "slot": 0, "generation": 1,
             "files": [{"name": "x.safetensors", "header": b"", "offset": 0, "size": 8}]})),
    ("inline file ../../evil.msgpack",
     encode({"op": "save", "id": 1, "run": "r", "tag": "t", "step": 1,
             "inline": {"../../evil.msgpack": b"x"}, "files": []})),
    ("slot message without a descriptor",
     encode({"op": "slot", "slot": 0, "size": 1 << 20, "generation": 1})),
    ("drain timeout of the wrong type", encode({"op": "drain", "timeout": "soon"})),
    ("truncated frame, then EOF", b"\x00\x00\x00\x10" + msgpack.packb({"op": "status"})[:3]),
]  # fmt: skip


@pytest.mark.parametrize(("label", "payload"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_messages_drop_only_that_client(
    daemon, label: str, payload: bytes, fault_log
) -> None:  # type: ignore[no-untyped-def]
    with Checkpointer("bystander", socket=daemon.socket) as bystander:
        s = raw_socket(daemon.socket)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        _drain_replies(s)
        s.close()
        bystander.save(1, model=Net()).wait(timeout=30)  # an open connection keeps working
    _alive_and_serving(daemon)
    lost = int(not ckptd.list_checkpoints(os.path.join(daemon.root, "bystander")))
    fault_log(f"hostile message: {label}", 1, 1, lost)
    assert not os.path.exists(os.path.join(os.path.dirname(daemon.root), "evil.msgpack"))
    assert not os.path.exists("/etc/checkpoints")


def test_save_pointing_outside_its_arena_is_refused(daemon) -> None:  # type: ignore[no-untyped-def]
    from ckptd.header import encode_header

    s = raw_socket(daemon.socket)
    fd = _memfd(4096)
    frame = encode({"op": "slot", "slot": 0, "size": 4096, "generation": 1})
    socket.send_fds(s, [frame], [fd])
    header = encode_header({"w": {"dtype": "U8", "shape": [8192], "data_offsets": [0, 8192]}})
    s.sendall(encode({"op": "save", "id": 1, "run": "evil", "tag": "t", "step": 1, "slot": 0,
                      "generation": 1,
                      "files": [{"name": "m.weights.safetensors", "header": header, "offset": 0, "size": 8192}]}))  # fmt: skip
    s.shutdown(socket.SHUT_WR)
    reply = _drain_replies(s)
    s.close()
    os.close(fd)
    assert b"outside" in reply
    assert not os.path.exists(os.path.join(daemon.root, "evil", "checkpoints", "t"))
    _alive_and_serving(daemon)


def test_random_bytes_fuzz(daemon, fault_log) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(1234)
    for i in range(40):
        s = raw_socket(daemon.socket)
        n = rng.choice([1, 3, 4, 17, 300, 5000])
        blob = bytes(rng.getrandbits(8) for _ in range(n))
        if i % 3 == 0:  # a plausible length prefix in front of garbage
            blob = len(blob).to_bytes(4, "big") + blob
        s.sendall(blob)
        s.close()
    _alive_and_serving(daemon)
    fault_log("random bytes on the socket", 40, 1, 0)


TRAINER = textwrap.dedent(
    """
    import os, signal, sys, torch
    from ckptd import Checkpointer
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    ckpt = Checkpointer("crashy", socket=sys.argv[1])
    ckpt.save(42, model=model, extra={"why": "killed right after save"})
    torch.save(model.state_dict(), sys.argv[2])
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_trainer_killed_right_after_save_still_commits(daemon, tmp_path, fault_log) -> None:  # type: ignore[no-untyped-def]
    ref = tmp_path / "ref.pt"
    proc = subprocess.run([sys.executable, "-c", TRAINER, daemon.socket, str(ref)], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    with Checkpointer("observer", socket=daemon.socket) as ckpt:
        reply = ckpt._conn.request({"op": "drain", "timeout": 60})  # type: ignore[union-attr]
    assert reply["ok"], reply
    state = ckptd.load(os.path.join(daemon.root, "crashy"))
    expect = torch.load(ref, weights_only=True)
    assert bitwise_equal(state["model"], expect)
    assert state["extra"] == {"why": "killed right after save"}
    fault_log("trainer SIGKILLed right after save() returned", 1, 1, 0)


def test_corrupt_file_is_caught_and_restore_falls_back(daemon, fault_log) -> None:  # type: ignore[no-untyped-def]
    model = Net()
    opt = torch.optim.Adam(model.parameters())
    with Checkpointer("torn", socket=daemon.socket) as ckpt:
        ckpt.save(1, model=model, optimizer=opt).wait()
        good = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            model.body[0].weight.add_(1)
        ckpt.save(2, model=model, optimizer=opt).wait()
    run = os.path.join(daemon.root, "torn")
    bad = os.path.join(run, "checkpoints", "step-00000002", "model.weights.safetensors")
    with open(bad, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"\xde\xad\xbe")
    out = subprocess.run(
        [sys.executable, "-m", "ckptd", "verify", run], capture_output=True, text=True
    )
    assert out.returncode == 1 and "model.weights.safetensors" in out.stderr
    with pytest.raises(ckptd.IntegrityError, match=r"model\.weights\.safetensors"):
        ckptd.load(run)
    fresh = Net()
    with Checkpointer("torn", socket=daemon.socket) as ckpt:
        meta = ckpt.restore(fresh, torch.optim.Adam(fresh.parameters()))
    assert meta is not None and meta["tag"] == "step-00000001"
    assert bitwise_equal(fresh.state_dict(), good)
    # A truncated file is caught by its size alone.
    with open(bad, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ckptd.IntegrityError, match="bytes on disk"):
        ckptd.load(run, tag="step-00000002")
    # The corrupted one is damaged by the test itself; the other is restored intact.
    fault_log("bytes flipped, then file truncated (caught, never loaded)", 2, 2, 0)


def test_second_daemon_on_same_root_refuses(daemon, short_dir: str) -> None:  # type: ignore[no-untyped-def]
    out = subprocess.run(
        [sys.executable, "-m", "ckptd", "serve", "--root", daemon.root, "--socket",
         os.path.join(short_dir, "other.sock")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    assert "another ckptd daemon" in out.stderr and daemon.root in out.stderr
    _alive_and_serving(daemon)


def test_restart_removes_partial_and_keeps_committed(daemon, fault_log) -> None:  # type: ignore[no-untyped-def]
    with Checkpointer("restart", socket=daemon.socket) as ckpt:
        ckpt.save(1, model=Net()).wait()
    daemon.kill()
    ck = os.path.join(daemon.root, "restart", "checkpoints")
    os.makedirs(os.path.join(ck, "step-00000002.partial"))
    os.makedirs(os.path.join(ck, "step-00000003"))  # renamed but no manifest: a crash window
    open(os.path.join(ck, "step-00000003", "model.weights.safetensors"), "wb").close()
    daemon.start()
    assert sorted(os.listdir(ck)) == ["step-00000001"]
    assert "1 committed checkpoint(s), 2 incomplete removed" in daemon.log_text()
    assert [m["tag"] for m in ckptd.list_checkpoints(os.path.join(daemon.root, "restart"))] == [
        "step-00000001"
    ]
    fault_log("daemon SIGKILLed, torn directories left", 2, 1, 0)


def test_tag_is_never_overwritten(daemon) -> None:  # type: ignore[no-untyped-def]
    with Checkpointer("dup", socket=daemon.socket) as ckpt:
        ckpt.save(1, model=Net()).wait()
        h = ckpt.save(1, model=Net())
        with pytest.raises(ckptd.SaveError, match="already exists"):
            h.wait(timeout=30)


@pytest.fixture
def tiny_fs(tmp_path):  # type: ignore[no-untyped-def]
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    yield str(mnt)
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_fails_the_save_clearly_and_daemon_keeps_serving(
    make_daemon, tiny_fs, fault_log
) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(root=os.path.join(tiny_fs, "root"))
    big = torch.nn.Linear(1024, 1024)  # 4 MiB of weights > 3 MiB disk
    with Checkpointer("full", socket=d.socket) as ckpt:
        h = ckpt.save(1, model=big)
        with pytest.raises(ckptd.SaveError, match=r"disk .* is full"):
            h.wait(timeout=60)
        assert not os.path.exists(
            os.path.join(d.root, "full", "checkpoints", "step-00000001.partial")
        )
        ckpt.save(2, model=torch.nn.Linear(8, 8)).wait(timeout=30)  # room for a small one
    assert [m["step"] for m in ckptd.list_checkpoints(os.path.join(d.root, "full"))] == [2]
    # The save that did not fit was never committed (its handle said why); nothing committed lost.
    fault_log("disk full (3 MiB tmpfs) during a save", 1, 1, 0)


def test_unwritable_root_is_a_clear_start_error(tmp_path, short_dir: str) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "ro"
    root.mkdir()
    blocker = root / "file"
    blocker.write_text("x")
    with pytest.raises(ckptd.DaemonUnavailableError):
        DaemonProcess(str(blocker / "sub"), os.path.join(short_dir, "ro.sock"), timeout=30)
    out = subprocess.run(
        [sys.executable, "-m", "ckptd", "serve", "--root", str(blocker / "sub"), "--socket",
         os.path.join(short_dir, "ro2.sock")], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0 and "cannot create root" in out.stderr


def test_dead_clients_leak_no_memory_or_descriptors(daemon) -> None:  # type: ignore[no-untyped-def]
    """Arenas are memfds passed to the daemon: nothing in /dev/shm, descriptors closed when done."""

    def daemon_fds() -> int:
        return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))

    shm_before = set(os.listdir("/dev/shm"))
    with Checkpointer("warm", socket=daemon.socket) as ckpt:
        ckpt.save(1, model=torch.nn.Linear(4, 4)).wait()
    fds_before = daemon_fds()
    for i in range(5):
        ref = os.path.join(daemon.root, f"ref{i}.pt")
        proc = subprocess.run([sys.executable, "-c", TRAINER, daemon.socket, ref], timeout=120)
        assert proc.returncode == -signal.SIGKILL
    with Checkpointer("watch", socket=daemon.socket) as ckpt:
        assert ckpt._conn.request({"op": "drain", "timeout": 60})["ok"]  # type: ignore[union-attr]
    deadline = time.monotonic() + 30
    while daemon_fds() > fds_before:  # closed as each job finishes: poll with a bound
        assert time.monotonic() < deadline, "the daemon kept dead clients' descriptors"
        time.sleep(0.05)
    assert set(os.listdir("/dev/shm")) <= shm_before
