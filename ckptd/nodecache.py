"""Once per node: ranks that restore the same checkpoint from a store download it once.

Opt-in with ``CKPTD_NODE_CACHE=<dir>`` (a node-local directory every rank of the node can
write, e.g. local NVMe). The first rank to ask for a store checkpoint takes an exclusive
``flock`` on ``<dir>/<url digest>.lock``, downloads the files (concurrent ranged reads, each
checked against the manifest) into ``<dir>/<url digest>/<manifest digest>/`` and writes the
manifest there last; the other ranks block on the same lock (no polling) and then read the copy
from local disk, verifying it again as every local read does. The lock is held shared while a
copy is read, so the one rank that replaces the entry with a newer checkpoint (one entry per
URL is kept) never deletes files under a reader. A copy that does not verify is discarded and
the store read directly. ``flock`` is advisory and node-local, which is what is wanted: a
crashed rank's lock goes with its process. No torch here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator

from .atomic import temp_name
from .catalog import Located, checkpoint_directory, run_sync
from .errors import CkptdError
from .names import MANIFEST
from .readinto import Source, check_crc, read_listed
from .storage import ProgressFn, is_local
from .storage.base import crc32c_combine

__all__ = ["ENV", "cache_dir", "discard", "node_copy"]

ENV = "CKPTD_NODE_CACHE"
log = logging.getLogger("ckptd.nodecache")
_WINDOW = 64 << 20  # bytes of a file in memory at once while it is copied to the cache


def cache_dir() -> str | None:
    """The node cache directory, when ``CKPTD_NODE_CACHE`` enables one."""
    return os.environ.get(ENV) or None


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@contextlib.contextmanager
def _locked(path: str, mode: int) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def node_copy(loc: Located, progress: ProgressFn | None = None) -> Iterator[Located | None]:
    """This node's verified-on-read copy of the store checkpoint ``loc`` (fetched by the first
    rank that asks), held against eviction while the caller reads it; None when the cache is
    off, ``loc`` is local, or the copy could not be made (the caller reads the store)."""
    root = cache_dir()
    if root is None or loc.directory is not None or is_local(loc.url):
        yield None
        return
    os.makedirs(root, exist_ok=True)
    url_dir = os.path.join(root, _digest(loc.url))
    canon = json.dumps(loc.manifest, sort_keys=True, separators=(",", ":"))
    entry = os.path.join(url_dir, _digest(canon))
    lock = url_dir + ".lock"
    with _locked(lock, fcntl.LOCK_EX):
        if _present(entry, loc) is None:
            try:
                _fetch(loc, url_dir, entry, progress)
            except (CkptdError, OSError) as e:
                log.warning("could not copy %s@%s to the node cache: %s", loc.url, loc.tag, e)
                shutil.rmtree(entry, ignore_errors=True)
    with _locked(lock, fcntl.LOCK_SH):
        # Between the two locks another rank may have replaced the entry: check again.
        yield _present(entry, loc)


def discard(found: Located) -> None:
    """Drop a cached copy that failed verification (the next rank refetches it)."""
    shutil.rmtree(found.url, ignore_errors=True)


def _present(entry: str, loc: Located) -> Located | None:
    try:
        found = checkpoint_directory(entry)
    except CkptdError:
        return None
    if found is None or found[1] != loc.manifest:
        return None
    return Located(found[0], loc.tag, found[1], directory=found[0])


def _fetch(loc: Located, url_dir: str, entry: str, progress: ProgressFn | None) -> None:
    """Replace whatever ``url_dir`` holds by ``loc``'s files at ``entry`` (manifest last)."""
    shutil.rmtree(url_dir, ignore_errors=True)
    os.makedirs(entry)

    async def go() -> None:
        src = Source.of(loc)
        try:
            for name, rec in loc.manifest["files"].items():
                await _copy_file(src, name, rec, os.path.join(entry, name), progress)
        finally:
            await src.close()

    run_sync(go())
    data = json.dumps(loc.manifest).encode()
    tmp = temp_name(os.path.join(entry, MANIFEST))
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, os.path.join(entry, MANIFEST))


async def _copy_file(
    src: Source, name: str, rec: dict, path: str, progress: ProgressFn | None
) -> None:
    size = int(rec["size"])
    buf = memoryview(bytearray(min(size, _WINDOW)))
    value = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        for offset in range(0, size, _WINDOW):
            n = min(_WINDOW, size - offset)
            crc = await read_listed(src, name, rec, buf[:n], offset=offset, progress=progress)
            value = crc32c_combine(value, crc, n)
            view = buf[:n]
            pos = 0
            while pos < n:
                pos += os.pwrite(fd, view[pos:], offset + pos)
    finally:
        os.close(fd)
    check_crc(name, rec, value)
