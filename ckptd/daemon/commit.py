"""Local commit: write a staged save into ``<tag>.partial/``, fsync, rename, MANIFEST last.

Runs in worker threads (every call here blocks). Checksums are computed by a second thread while
the first writes, over the same shared-memory bytes, so hashing costs no wall time.

Commit order, each step durable before the next:
  1. ``<run>/checkpoints/<tag>.partial/<file>``: header + arena bytes, CRC32C alongside, fsync
  2. fsync the partial directory, rename it to ``<tag>/``, fsync ``checkpoints/``
  3. ``<tag>/MANIFEST.json`` (temp + fsync + rename): the commit marker
  4. ``<run>/latest`` (temp + fsync + rename), only if this is the newest step
A reader trusts a checkpoint only through its manifest, so a crash anywhere leaves either a
complete checkpoint or a directory the next start removes.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import crc32c

from ..errors import SaveError
from ..storage.local import fsync_dir

_CHUNK = 64 << 20
_HASHERS = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="ckptd-crc")


@dataclass(slots=True)
class StagedFile:
    name: str
    header: bytes
    offset: int  # in the slot
    size: int  # data section bytes


def crc_hex(value: int) -> str:
    return f"{value:08x}"


def write_file(path: str, header: bytes, data: memoryview, progress: Callable[[int], None]) -> int:
    """Write header + data to ``path`` and fsync; returns the CRC32C of the whole file."""
    crc_future = _HASHERS.submit(_crc_of, header, data)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, memoryview(header))
            pos = 0
            while pos < len(data):
                n = _write_all(fd, data[pos : pos + _CHUNK])
                pos += n
                progress(n)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        # The hasher reads the same shared memory: it must be done before the caller unmaps.
        concurrent.futures.wait([crc_future])
    return crc_future.result()


def _crc_of(header: bytes, data: memoryview) -> int:
    value = crc32c.crc32c(header)
    for pos in range(0, len(data), _CHUNK):
        value = crc32c.crc32c(data[pos : pos + _CHUNK], value)
    return value


def _write_all(fd: int, view: memoryview) -> int:
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])
    return done


def checkpoint_dir(root: str, run: str, tag: str) -> str:
    return os.path.join(root, run, "checkpoints", tag)


def write_staged(
    root: str,
    run: str,
    tag: str,
    files: list[StagedFile],
    inline: dict[str, bytes],
    slot: memoryview,
    progress: Callable[[int], None],
) -> tuple[str, dict[str, dict[str, Any]]]:
    """Step 1: every data file into ``<tag>.partial``. Returns (partial dir, file records)."""
    final = checkpoint_dir(root, run, tag)
    if os.path.exists(os.path.join(final, "MANIFEST.json")):
        raise SaveError(f"checkpoint {run}@{tag} already exists; tags are never overwritten")
    partial = final + ".partial"
    if os.path.exists(partial):
        shutil.rmtree(partial)
    if os.path.isdir(final):  # a directory left without its manifest by a crash
        shutil.rmtree(final)
    os.makedirs(partial)
    records: dict[str, dict[str, Any]] = {}
    for f in files:
        crc = write_file(
            os.path.join(partial, f.name), f.header, slot[f.offset : f.offset + f.size], progress
        )
        records[f.name] = {"size": len(f.header) + f.size, "crc32c": crc_hex(crc)}
    for name, data in inline.items():
        crc = write_file(os.path.join(partial, name), b"", memoryview(data), progress)
        records[name] = {"size": len(data), "crc32c": crc_hex(crc)}
    return partial, records


def write_staged_safely(
    *args: Any,
) -> tuple[str | None, dict[str, dict[str, Any]], Exception | None]:
    """``write_staged`` that returns its error instead of raising it.

    A raised error's traceback would keep slices of the shared-memory view alive in its frames,
    and the caller could then not unmap the slot. The returned error carries no traceback.
    """
    err: Exception
    try:
        partial, records = write_staged(*args)
    except OSError as e:
        err = OSError(e.errno, e.strerror, e.filename)
    except SaveError as e:
        err = SaveError(str(e))
    else:
        return partial, records, None
    final = checkpoint_dir(args[0], args[1], args[2])
    shutil.rmtree(final + ".partial", ignore_errors=True)
    return None, {}, err


def commit(partial: str, manifest: dict[str, Any]) -> str:
    """Steps 2-3: rename the partial directory into place and write the manifest last."""
    final = partial[: -len(".partial")]
    fsync_dir(partial)
    os.rename(partial, final)
    fsync_dir(os.path.dirname(final))
    write_atomic(os.path.join(final, "MANIFEST.json"), json.dumps(manifest, indent=1).encode())
    return final


def write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, memoryview(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def update_latest(root: str, run: str, tag: str) -> None:
    """Step 4: ``<run>/latest`` names the newest tag. A hint: readers fall back to manifests."""
    write_atomic(os.path.join(root, run, "latest"), (tag + "\n").encode())
