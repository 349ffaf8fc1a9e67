"""A full disk (or a failing one) at any step of a local commit leaks nothing and loses nothing.

The daemon's write path is ``write_staged`` -> ``commit`` (rename, manifest) -> ``update_latest``.
Each system call that step makes is failed in turn (ENOSPC for writes, EIO for fsync and
renames); after every failure the root holds no partial directory, no temp file and no
half-committed checkpoint, and the checkpoint committed before is untouched.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

import crc32c
import pytest

from ckptd.daemon import commit as commit_mod
from ckptd.daemon.commit import StagedFile, commit, update_latest, write_staged
from ckptd.daemon.lease import BytesSource

ARENA = os.urandom(3 * 4096)
FILES = [StagedFile("model.weights.safetensors", b"HDR", 0, 3 * 4096)]


def _save(root: str, tag: str) -> None:
    partial, records = write_staged(
        root, "r", tag, FILES, {"extra.msgpack": b"\x80"}, BytesSource(ARENA), lambda n: None
    )
    commit(partial, {"tag": tag, "step": 1, "files": records})
    update_latest(root, "r", tag)


class Injector:
    """Counts calls to one os function and fails the n-th with ``code``."""

    def __init__(self, name: str, code: int, fail_at: int | None) -> None:
        self.name, self.code, self.fail_at, self.calls = name, code, fail_at, 0
        self.real: Callable[..., Any] = getattr(os, name)

    def __call__(self, *args: Any, **kw: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(self.code, os.strerror(self.code))
        return self.real(*args, **kw)


OPS = [("write", errno.ENOSPC), ("fsync", errno.EIO), ("rename", errno.EIO),
       ("replace", errno.ENOSPC), ("open", errno.ENOSPC)]  # fmt: skip


def _count(tmp_path, monkeypatch, name: str) -> int:  # type: ignore[no-untyped-def]
    probe = Injector(name, 0, None)
    monkeypatch.setattr(os, name, probe)
    _save(str(tmp_path / "probe"), "t1")
    monkeypatch.setattr(os, name, probe.real)
    return probe.calls


def _leftovers(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            if n.endswith(".partial") or ".tmp-" in n:
                out.append(os.path.join(dirpath, n))
    return out


@pytest.mark.parametrize(("op", "code"), OPS, ids=[o for o, _ in OPS])
def test_a_failure_at_every_call_of_a_commit_leaks_and_loses_nothing(  # type: ignore[no-untyped-def]
    tmp_path, monkeypatch, fault_log, op: str, code: int
) -> None:
    monkeypatch.setattr(commit_mod, "_WRITE_CHUNK", 4096)  # several chunks per file
    calls = _count(tmp_path, monkeypatch, op)
    assert calls > 0
    for n in range(1, calls + 1):
        root = str(tmp_path / f"{op}-{n}")
        _save(root, "t0")  # committed before the fault: must survive it
        inj = Injector(op, code, n)
        monkeypatch.setattr(os, op, inj)
        try:
            _save(root, "t1")
        except OSError as e:
            assert e.errno == code
            failed = True
        else:
            failed = False
        finally:
            monkeypatch.setattr(os, op, inj.real)
        assert not _leftovers(root), (op, n, _leftovers(root))
        ck = os.path.join(root, "r", "checkpoints")
        t1 = os.path.join(ck, "t1")
        if failed and not os.path.exists(os.path.join(t1, "MANIFEST.json")):
            assert not os.path.exists(t1), (op, n)  # invisible, and nothing of it left
        with open(os.path.join(ck, "t0", "model.weights.safetensors"), "rb") as f:
            assert crc32c.crc32c(f.read()) == crc32c.crc32c(b"HDR" + ARENA)
    fault_log(f"disk fault: {errno.errorcode[code]} at each os.{op} of a commit", calls, calls, 0)
