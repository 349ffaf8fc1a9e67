"""The daemon's local write path, without a daemon: bytes, checksums and fds."""

from __future__ import annotations

import os

import crc32c
import pytest

from ckptd.daemon import commit
from ckptd.daemon.commit import StagedFile, write_staged
from ckptd.daemon.lease import BytesSource, SlotLease
from ckptd.errors import SaveError


@pytest.mark.parametrize("kernel_hint", [True, False])
def test_staged_files_land_whole_with_their_checksums(tmp_path, monkeypatch, kernel_hint) -> None:  # type: ignore[no-untyped-def]
    """Every file is written, then fsynced; with or without sync_file_range the bytes and CRCs
    are the same, and no descriptor is left open."""
    if not kernel_hint:
        monkeypatch.setattr(commit, "_SYNC_FILE_RANGE", None)
    monkeypatch.setattr(commit, "_WRITE_CHUNK", 4096)  # many chunks, each handed to the kernel
    arena = os.urandom(3 * 4096 + 100)
    files = [
        StagedFile("a.safetensors", b"HEADER-A", 0, 5000),
        StagedFile("b.safetensors", b"HB", 6000, 3010, segments=[(6000, 3000), (100, 10)]),
    ]
    fds_before = len(os.listdir("/proc/self/fd"))
    partial, records = write_staged(
        str(tmp_path),
        "run",
        "t1",
        files,
        {"extra.msgpack": b"\x80"},
        BytesSource(arena),
        lambda n: None,
    )
    assert len(os.listdir("/proc/self/fd")) == fds_before
    want = {
        "a.safetensors": b"HEADER-A" + arena[:5000],
        "b.safetensors": b"HB" + arena[6000:9000] + arena[100:110],
        "extra.msgpack": b"\x80",
    }
    for name, data in want.items():
        with open(os.path.join(partial, name), "rb") as f:
            assert f.read() == data
        assert records[name] == {"size": len(data), "crc32c": f"{crc32c.crc32c(data):08x}"}


def test_a_failed_write_closes_what_it_opened(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls = {"n": 0}
    real_write = os.write

    def failing_write(fd: int, data: object) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(commit.os, "write", failing_write)
    files = [StagedFile("a", b"h", 0, 10), StagedFile("b", b"h", 10, 10)]
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError):
        write_staged(str(tmp_path), "run", "t1", files, {}, BytesSource(bytes(20)), lambda n: None)
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "t1.partial")


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("slot")
    os.write(fd, data)
    return fd


def test_a_slot_that_shrinks_fails_that_save_only(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The daemon reads slots with pread, so a client that truncates its memory mid-write makes
    its own save fail with an error, where a mapping would have killed the daemon with SIGBUS."""
    fd = _memfd(os.urandom(1 << 16))
    shrink_after = {"n": 0}

    def progress(n: int) -> None:
        shrink_after["n"] += 1
        if shrink_after["n"] == 1:
            os.ftruncate(fd, 100)

    monkeypatch.setattr(commit, "_WRITE_CHUNK", 4096)
    files = [StagedFile("a.safetensors", b"h", 0, 1 << 16)]
    try:
        with SlotLease(fd, 1 << 16) as lease, pytest.raises(SaveError, match="shrank"):
            write_staged(str(tmp_path), "run", "t1", files, {}, lease, progress)
    finally:
        os.close(fd)
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "t1.partial")


def test_bytes_checksummed_are_the_bytes_written_while_the_client_scribbles(  # type: ignore[no-untyped-def]
    tmp_path, monkeypatch
) -> None:
    """A client writing into its slot during the write gets a torn but self-consistent file:
    the recorded CRC is the CRC of what is on disk, so verify and upload agree with the manifest."""
    monkeypatch.setattr(commit, "_WRITE_CHUNK", 4096)
    size = 16 * 4096
    fd = _memfd(bytes(size))

    def progress(n: int) -> None:
        os.pwrite(fd, os.urandom(size), 0)  # the client changes everything between chunks

    try:
        with SlotLease(fd, size) as lease:
            partial, records = write_staged(
                str(tmp_path), "run", "t1", [StagedFile("a", b"h", 0, size)], {}, lease, progress
            )
    finally:
        os.close(fd)
    with open(os.path.join(partial, "a"), "rb") as f:
        data = f.read()
    assert records["a"] == {"size": size + 1, "crc32c": f"{crc32c.crc32c(data):08x}"}


def test_a_lease_closes_its_descriptor_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    fd = _memfd(b"x" * 10)
    fds_before = len(os.listdir("/proc/self/fd"))
    lease = SlotLease(fd, 10)
    assert len(os.listdir("/proc/self/fd")) == fds_before + 1
    with lease:
        pass
    lease.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before
    with pytest.raises(SaveError):
        lease.read_into(0, memoryview(bytearray(1)))
    os.close(fd)
