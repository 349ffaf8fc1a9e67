"""Reading a checkpoint's files straight into caller-owned memory, checked as they arrive.

One read path for ``ckptd.load``, ``Checkpointer.restore``, ``ckptd.dcp.Reader`` and ``ckptd
restore`` (``copy_files``: part-sized buffers written on with ``pwrite``), local or remote: each listed file goes into a buffer the caller allocated once (a torch tensor's memory,
a bytearray), by large ``preadv`` calls from the local copy or concurrent ranged GETs from the
store (``Store.read_into``). Parts are checksummed in worker threads as they land and their
CRC32Cs combined, so download, verification and copy overlap; there is no temporary file, no
second copy and no whole-file ``bytes``. Local files are opened as ``catalog.open_listed`` opens
them (never through a link, a regular file of the listed size), so a planted link or a short
file is an ``IntegrityError`` naming the file, exactly as before. No torch here.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import crc32c

from .catalog import Located, open_listed, run_sync
from .errors import IntegrityError, NotFoundError
from .storage import ProgressFn, Store, is_local, join_key, open_store
from .storage.base import (
    READ_PART,
    combine_crcs,
    crc32c_combine,
    part_spans,
    preadv_crc,
    read_ranges_into,
    run_all,
)

__all__ = [
    "MMAP_ENV",
    "Source",
    "check_crc",
    "copy_files",
    "map_file",
    "mapping_wanted",
    "read_file",
    "read_files",
    "read_listed",
    "verify_store_copy",
]

_LOCAL_PART = 4 << 20  # per preadv: its CRC32C follows while the part is still in cache
_LOCAL_THREADS = 4
_LOCAL_GATE = max(2, min(8, os.cpu_count() or 2))  # local parts in flight over all files
_FILES_AT_ONCE = 4  # small files overlap their latency; big ones share the store's slots
_VERIFY_WINDOW = 128 << 20  # what a verify holds per file: a window of parts in flight
_VERIFY_FILES = 2
_COPY_PART = READ_PART  # what one copy worker holds: one part read, then written with pwrite
_COPY_PARTS = 8  # parts in flight over all files of a copy: it holds at most 8 x 16 MiB


@dataclass(slots=True)
class Source:
    """Where a located checkpoint's files are read from: a local directory or a store."""

    loc: Located
    store: Store | None = None  # None: local, ``loc.source()`` is the directory
    gate: asyncio.Semaphore | None = None  # local parts in flight (one per CPU)

    @classmethod
    def of(cls, loc: Located) -> Source:
        if loc.directory is not None or is_local(loc.url):
            return cls(loc, gate=asyncio.Semaphore(_LOCAL_GATE))
        return cls(loc, open_store(loc.url))

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()


async def read_listed(
    src: Source,
    name: str,
    rec: dict[str, Any],
    buf: memoryview,
    *,
    offset: int = 0,
    progress: ProgressFn | None = None,
) -> int:
    """Read bytes ``[offset, offset + len(buf))`` of the listed file ``name`` into ``buf``;
    returns their CRC32C. The file must have the manifest's size (``IntegrityError`` naming it
    otherwise, and when it is missing). The caller checks the CRC (a whole file: ``read_file``).
    """
    size = int(rec["size"])
    if src.store is None:
        with open_listed(*src.loc.local_file(name), rec, src.loc.label(name)) as f:
            fd = f.fileno()

            async def fetch(start: int, view: memoryview) -> int:
                return await asyncio.to_thread(preadv_crc, fd, view, start, name)

            return await read_ranges_into(
                buf, offset, _LOCAL_PART, _LOCAL_THREADS, fetch, progress, src.gate
            )
    key = join_key(*src.loc.parts(name))
    try:
        return await src.store.read_into(key, buf, offset=offset, total=size, progress=progress)
    except NotFoundError as e:
        raise IntegrityError(f"{name}: listed in the manifest but missing") from e
    except IntegrityError as e:
        raise IntegrityError(f"{name}: {e}") from e


def check_crc(name: str, rec: dict[str, Any], value: int) -> None:
    """Raise ``IntegrityError`` unless ``value`` is the manifest's CRC32C of ``name``."""
    want = str(rec["crc32c"]).lower()
    if f"{value:08x}" != want:
        raise IntegrityError(f"{name}: CRC32C {value:08x} does not match the manifest's {want}")


async def read_file(
    src: Source, name: str, rec: dict[str, Any], buf: memoryview, progress: ProgressFn | None
) -> None:
    """The whole listed file into ``buf`` (exactly its size), checked against its CRC32C."""
    if len(buf) != int(rec["size"]):
        raise IntegrityError(f"{name}: buffer of {len(buf)} bytes for a {rec['size']} byte file")
    check_crc(name, rec, await read_listed(src, name, rec, buf, progress=progress))


async def read_files(
    src: Source,
    names: Sequence[str],
    alloc: Callable[[str, int], memoryview],
    progress: ProgressFn | None = None,
    done: Callable[[str], None] | None = None,
) -> None:
    """Read each of ``names`` (listed in ``src.loc.manifest``) whole into ``alloc(name, size)``,
    a few files at once, each checked against the manifest; the first failure cancels the rest.
    ``done(name)`` is called in the event loop as each file has verified (a GPU copy starts
    there, overlapping the reads still in flight)."""
    files = src.loc.manifest["files"]
    gate = asyncio.Semaphore(_FILES_AT_ONCE)

    async def one(name: str) -> None:
        async with gate:
            rec = files[name]
            await read_file(src, name, rec, alloc(name, int(rec["size"])), progress)
        if done is not None:
            done(name)

    await run_all([one(n) for n in names])


async def _verify_file(
    src: Source, name: str, rec: dict[str, Any], progress: ProgressFn | None
) -> None:
    size = int(rec["size"])
    buf = memoryview(bytearray(min(size, _VERIFY_WINDOW)))
    value = 0
    for offset in range(0, size, _VERIFY_WINDOW):
        n = min(_VERIFY_WINDOW, size - offset)
        crc = await read_listed(src, name, rec, buf[:n], offset=offset, progress=progress)
        value = crc32c_combine(value, crc, n)
    check_crc(name, rec, value)


def verify_store_copy(loc: Located, progress: ProgressFn | None = None) -> None:
    """Check every file of ``loc`` (in a store) against its manifest without a local copy:
    concurrent ranged reads through a bounded window per file, CRC32C combined as they land.
    ``IntegrityError`` names the file (``ckptd verify`` of a store URL)."""
    files = loc.manifest["files"]

    async def go() -> None:
        src = Source.of(loc)
        gate = asyncio.Semaphore(_VERIFY_FILES)

        async def one(name: str) -> None:
            async with gate:
                await _verify_file(src, name, files[name], progress)

        try:
            await run_all([one(n) for n in files])
        finally:
            await src.close()

    run_sync(go())


async def copy_files(
    src: Source,
    names: Sequence[str],
    opened: Callable[[str], Any],
    progress: ProgressFn | None = None,
) -> None:
    """Copy each of ``names`` (listed in ``src.loc.manifest``) into a file the caller creates,
    part by part: each part is read (ranged GET or ``preadv``) into one of a few part-sized
    buffers and written at its offset with ``pwrite`` while the other parts download, its
    CRC32C combined in order and checked against the manifest before the file is given back.

    ``opened(name)`` is an async context manager yielding the fd to write; it sees the
    exception when the copy fails (and may then remove what it created), and on success makes
    the file final (fsync, rename) on exit. No temporary copy, no whole file in memory: the
    process holds at most ``_COPY_PARTS`` parts. The first failure cancels the rest."""
    files = src.loc.manifest["files"]
    pool: asyncio.Queue[memoryview] = asyncio.Queue()
    for _ in range(_COPY_PARTS):
        pool.put_nowait(memoryview(bytearray(0)))  # grown to a part on first use

    gate = asyncio.Semaphore(_FILES_AT_ONCE)  # open files at once; parts are bounded by ``pool``

    async def one(name: str) -> None:
        rec = files[name]
        spans = part_spans(int(rec["size"]), _COPY_PART)
        crcs: list[tuple[int, int]] = [(0, 0)] * len(spans)
        todo = iter(range(len(spans)))
        async with gate, opened(name) as fd:

            async def worker() -> None:
                for i in todo:
                    a, b = spans[i]
                    buf = await pool.get()
                    try:
                        if len(buf) < b - a:
                            buf = memoryview(bytearray(_COPY_PART))
                        view = buf[: b - a]
                        crc = await read_listed(src, name, rec, view, offset=a, progress=progress)
                        await asyncio.to_thread(_pwrite_all, fd, view, a)
                        crcs[i] = (crc, b - a)
                    finally:
                        pool.put_nowait(buf)

            if spans:  # an empty file has no parts (and CRC32C 0)
                await run_all([worker() for _ in range(min(_COPY_PARTS, len(spans)))])
            check_crc(name, rec, combine_crcs(crcs))

    if names:
        await run_all([one(n) for n in names])


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


# ---- local files mapped, not copied --------------------------------------------------------------

MMAP_ENV = "CKPTD_LOAD_MMAP"
"""``0`` turns mapped local reads off (each file is then read into memory of its own)."""
_MAP_PART = 8 << 20  # CRC32C of a mapped file in parts of this size, over a few threads


def mapping_wanted(src: Source) -> bool:
    return src.store is None and os.environ.get(MMAP_ENV, "1") != "0"


async def map_file(
    src: Source, name: str, rec: dict[str, Any], progress: ProgressFn | None = None
) -> mmap.mmap | None:
    """A local listed file mapped copy-on-write (``MAP_PRIVATE``, writable: a tensor written
    to copies its pages, the file never changes), checked against its size and CRC32C before
    it is handed out; None for an empty file. The page cache is the memory: no copy, which is
    what makes a local load faster than reading the file into a buffer of its own. ckptd never
    truncates or rewrites a committed file (every write is a new file renamed into place), so
    the mapping stays valid, even after retention deletes the checkpoint."""
    size = int(rec["size"])
    with open_listed(*src.loc.local_file(name), rec, src.loc.label(name)) as f:
        if size == 0:
            check_crc(name, rec, 0)
            return None
        mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
    try:
        with contextlib.suppress(OSError, AttributeError):
            mm.madvise(mmap.MADV_WILLNEED)
        view = memoryview(mm)
        try:

            async def crc_of(start: int, part: memoryview) -> int:
                value = await asyncio.to_thread(crc32c.crc32c, part)
                if progress is not None:
                    progress(len(part))
                return value

            gate = src.gate or asyncio.Semaphore(_LOCAL_GATE)
            crcs = await _crc_parts(view, crc_of, gate)
        finally:
            view.release()
        check_crc(name, rec, crcs)
    except BaseException:
        # Parts of the mapping may still be referenced (a thread's finished work item, a
        # traceback); then the mapping is unmapped when the last of them goes, not now.
        with contextlib.suppress(BufferError):
            mm.close()
        raise
    return mm


async def _crc_parts(
    view: memoryview, crc_of: Callable[[int, memoryview], Awaitable[int]], gate: asyncio.Semaphore
) -> int:
    spans = part_spans(len(view), _MAP_PART)
    crcs: list[tuple[int, int]] = [(0, 0)] * len(spans)

    async def one(i: int) -> None:
        a, b = spans[i]
        async with gate:
            crcs[i] = (await crc_of(a, view[a:b]), b - a)

    await run_all([one(i) for i in range(len(spans))])
    return combine_crcs(crcs)
