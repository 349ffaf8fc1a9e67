"""The daemon root's blobs (``<root>/<run>/shared/``): found, verified once, adopted, linked.

Runs in the write threads. A blob is trusted only after this daemon has read it whole and its
BLAKE3 digest matched its name (once per file, remembered by inode, size and mtime): a blob
that rotted on disk is removed, never linked into a new checkpoint, and the data is written
afresh from the staging memory. New blobs are adopted by hard-linking the file the write path
just wrote and checked, so adopting costs no copy; the blob exists (and its directory is
synced) before any manifest lists it, so a crash between the two leaves an orphan for gc,
never a manifest without its data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from dataclasses import dataclass, field

import crc32c

from ..atomic import fsync_dir
from ..blobs import BLOB_DIR, blob_file, hasher
from .lease import Source

log = logging.getLogger("ckptd.daemon")

_CHUNK = 8 << 20


@dataclass(slots=True)
class Dedup:
    """What one whole save's write needs for dedup, and what it found (for status)."""

    blobs: LocalBlobs
    run: str
    refs: set[str] = field(default_factory=set)
    """Blob files this save uses: retention keeps them while the save is in flight."""
    new_bytes: int = 0
    deduped: int = 0


class LocalBlobs:
    def __init__(self, root: str) -> None:
        self.root = root
        self._checked: dict[str, tuple[tuple[int, int, int], int]] = {}  # path -> (id, crc)
        self._lock = threading.Lock()

    def directory(self, run: str) -> str:
        return os.path.join(self.root, run, BLOB_DIR)

    def path(self, run: str, name: str, digest: str) -> str:
        return os.path.join(self.directory(run), blob_file(name, digest))

    def lookup(self, run: str, name: str, digest: str, size: int) -> tuple[str, int] | None:
        """(path, CRC32C) of the run's intact blob for ``digest``, or None when there is none;
        one that fails its check is removed (checkpoints that link it keep their copy, and
        fail their own verification)."""
        path = self.path(run, name, digest)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        ident = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._checked.get(path)
        if known is not None and known[0] == ident:
            return path, known[1]
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            self._discard(path, f"{st.st_size} bytes, a regular file of {size} expected")
            return None
        found, crc = hash_file(path)
        if found != digest:
            self._discard(path, f"its content hashes to {found}")
            return None
        with self._lock:
            self._checked[path] = (ident, crc)
        return path, crc

    def _discard(self, path: str, why: str) -> None:
        log.error("blob %s is corrupt (%s): removed; its data is written again", path, why)
        with self._lock:
            self._checked.pop(path, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def adopt(self, run: str, name: str, digest: str, written: str, crc: int) -> str:
        """Make ``written`` (a file just written and checksummed) the run's blob for
        ``digest``; a blob that appeared meanwhile (another save of the same bytes) is kept."""
        directory = self.directory(run)
        os.makedirs(directory, exist_ok=True)
        path = self.path(run, name, digest)
        try:
            os.link(written, path, follow_symlinks=False)
        except FileExistsError:
            return path
        fsync_dir(directory)
        st = os.lstat(path)
        with self._lock:
            self._checked[path] = ((st.st_ino, st.st_size, st.st_mtime_ns), crc)
        return path

    def forget(self, path: str) -> None:
        with self._lock:
            self._checked.pop(path, None)


def hash_file(path: str) -> tuple[str, int]:
    """(BLAKE3 hex digest, CRC32C) of a file, read once."""
    h = hasher()
    crc = 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := os.readv(fd, [view]):
            h.update(view[:n])
            crc = crc32c.crc32c(view[:n], crc)
    finally:
        os.close(fd)
    return h.hexdigest(), crc


def hash_staged(header: bytes, source: Source, pieces: list[tuple[int, int]]) -> str:
    """BLAKE3 of a staged file (header + its pieces of the slot), read through the daemon's
    own buffer like every read of a slot (``lease``)."""
    h = hasher()
    h.update(header)
    biggest = min(_CHUNK, max((n for _, n in pieces), default=0))
    buf = bytearray(biggest)
    for offset, size in pieces:
        for pos in range(0, size, _CHUNK):
            n = min(_CHUNK, size - pos)
            view = memoryview(buf)[:n]
            source.read_into(offset + pos, view)
            h.update(view)
    return str(h.hexdigest())


def read_head(path: str, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.pread(fd, n, 0)
    finally:
        os.close(fd)
