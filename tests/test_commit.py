"""The daemon's local write path, without a daemon: bytes, checksums and fds."""

from __future__ import annotations

import os

import crc32c
import pytest

from ckptd.daemon import commit
from ckptd.daemon.commit import StagedFile, write_staged


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
        memoryview(arena),
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
        write_staged(str(tmp_path), "run", "t1", files, {}, memoryview(bytes(20)), lambda n: None)
    assert len(os.listdir("/proc/self/fd")) == fds_before
