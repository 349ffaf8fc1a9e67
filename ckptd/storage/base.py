"""The one small protocol every store backend implements.

Keys are '/'-separated paths relative to the store's URL (``<run>/checkpoints/<tag>/<file>``).
Constructors do no network I/O; ``check_access()`` is the one explicit probe. Backends translate
their SDK's errors at one boundary into ``TransientStorageError`` (retry), ``PermanentStorageError``
(give up) or ``NotFoundError``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import crc32c as _crc32c

from ..atomic import temp_name, write_atomic
from ..errors import IntegrityError, NotFoundError, TransientStorageError
from .capabilities import FULL, Capabilities

ProgressFn = Callable[[int], None]
"""Called with the number of bytes just transferred (a delta, not a total)."""

READ_PART = 16 << 20
"""Bytes per ranged read of ``Store.read_into``: big enough to amortize a request, small enough
that many are in flight for one file (and that a retry re-reads little)."""
READ_CONCURRENCY = 8


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float | None = None
    """When the object was written (seconds since the epoch), where the store says."""


class Store(abc.ABC):
    """An object store rooted at ``url``. Safe to share between tasks of one event loop."""

    url: str
    pace: Callable[[int], Awaitable[None]] | None = None
    """Awaited with each part's (or small file's) size just before it is sent: the daemon's
    shared upload bandwidth limit (``ckptd.daemon.bandwidth``). None: full speed."""

    @abc.abstractmethod
    async def check_access(self) -> None:
        """Fail fast with a clear ``PermanentStorageError`` (no bucket, no credentials, denied)."""

    @abc.abstractmethod
    async def put_file(
        self,
        key: str,
        path: str,
        *,
        size: int,
        crc32c: int,
        journal: str | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        """Upload the local file ``path`` to ``key``, straight from the file, memory bounded.

        ``crc32c`` is the file's CRC32C as the manifest records it; the backend has the server
        verify it (or verifies what the server reports) and raises ``IntegrityError`` on mismatch.
        ``journal``, when given, is a local file path where the backend may persist resumable
        state (upload id, finished parts, session URI) so that a restarted daemon resumes instead of
        starting over; it is deleted once the object is complete.
        """

    @abc.abstractmethod
    async def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        """Write a small object in one request. ``if_absent`` makes it create-only."""

    @abc.abstractmethod
    async def get_bytes(
        self, key: str, *, start: int | None = None, end: int | None = None
    ) -> bytes:
        """Read a whole object or the byte range [start, end). ``NotFoundError`` if absent."""

    @abc.abstractmethod
    async def get_file(self, key: str, path: str, *, size: int | None = None) -> None:
        """Download ``key`` into the local file ``path`` (concurrent ranged reads where possible)."""

    async def read_into(
        self,
        key: str,
        buf: memoryview,
        *,
        offset: int = 0,
        total: int | None = None,
        concurrency: int | None = None,
        part_size: int | None = None,
        progress: ProgressFn | None = None,
    ) -> int:
        """Read ``len(buf)`` bytes of ``key`` from ``offset`` straight into ``buf``; return their
        CRC32C, computed as the parts arrive (several parts in flight at once).

        No temporary file and no object-sized ``bytes``: each part lands in its slice of ``buf``.
        ``NotFoundError`` if absent; ``IntegrityError`` if the object ends before
        ``offset + len(buf)`` or, with ``total``, is not exactly ``total`` bytes long. This
        generic version reads ranges with ``get_bytes``; backends override it to stream.
        """
        if total is not None:
            await self._check_total(key, offset + len(buf), total)

        async def fetch(start: int, view: memoryview) -> None:
            data = await self.get_bytes(key, start=start, end=start + len(view))
            if len(data) != len(view):
                raise IntegrityError(f"{key}: object ended before byte {start + len(view)}")
            view[:] = data

        return await read_ranges_into(
            buf, offset, part_size or READ_PART, concurrency or READ_CONCURRENCY, fetch, progress
        )

    async def _check_total(self, key: str, end: int, total: int) -> None:
        objs = [o for o in await self.list(key) if o.key == key]
        if not objs:
            raise NotFoundError(f"{self.url}/{key}")
        if objs[0].size != total:
            raise IntegrityError(f"{key}: object is {objs[0].size} bytes, expected {total}")

    @abc.abstractmethod
    async def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error."""

    async def abort_stale_uploads(self, prefix: str, older_than_s: float) -> int:
        """Abort unfinished multipart/resumable uploads under ``prefix``; returns how many."""
        return 0

    async def capabilities(self) -> Capabilities:
        """What this store really does (probed once, then cached, where a backend can lack
        features); the writes consult it to pick their fallbacks."""
        return FULL

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections. Idempotent."""

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def join_key(*parts: str) -> str:
    """Join key parts with '/', ignoring empty parts (``Path`` would mangle ``gs://``)."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


# -- Helpers shared by the network backends (S3, GCS) -------------------------------------------

# CRC32C of a concatenation from the CRCs of its pieces (zlib's crc32_combine, for the
# Castagnoli polynomial): lets parts be read and checksummed concurrently, in any order.
_POLY = 0x82F63B78


def _multmodp(a: int, b: int) -> int:
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
    table = [1 << 30]  # x^1
    for _ in range(31):
        table.append(_multmodp(table[-1], table[-1]))
    return table


_X2N = _x2n_table()


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC32C of ``A + B`` given ``crc(A)``, ``crc(B)`` and ``len(B)``."""
    p = 1 << 31  # x^0
    k = 3  # len2 bytes = len2 * 2**3 bits
    n = len2
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


def preadv_crc(fd: int, view: memoryview, offset: int, what: str) -> int:
    """Fill ``view`` from ``fd`` at ``offset`` and return its CRC32C, computed right after the
    read while the bytes are in cache; a file that ends early is an ``IntegrityError``."""
    pos = 0
    while pos < len(view):
        n = os.preadv(fd, [view[pos:]], offset + pos)
        if not n:
            raise IntegrityError(f"{what}: file ended at byte {offset + pos}")
        pos += n
    return _crc32c.crc32c(view)


def read_range_crc(path: str, offset: int, length: int) -> tuple[bytes, int]:
    """Read ``length`` bytes at ``offset`` straight from the file (``os.pread``, no staging copy)
    and return them with their CRC32C. Runs in a worker thread; both calls release the GIL."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks: list[bytes] = []
        got = 0
        while got < length:
            chunk = os.pread(fd, length - got, offset + got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    finally:
        os.close(fd)
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return data, _crc32c.crc32c(data)


def load_journal(path: str) -> dict[str, Any] | None:
    """The upload journal at ``path``, or None when it is missing or unreadable (start over)."""
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def save_journal(path: str, state: dict[str, Any]) -> None:
    """Write the upload journal atomically (temp file, fsync, rename): a crash mid-write keeps
    the previous version, never a torn one."""
    write_atomic(
        path, json.dumps(state, separators=(",", ":"), sort_keys=True).encode(), sync_dir=False
    )


def remove_journal(path: str | None) -> None:
    """Delete a finished or abandoned upload journal; a missing one is fine."""
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def run_all(coros: list[Awaitable[None]]) -> None:
    """Run ``coros`` concurrently; on the first failure cancel the rest and raise that error
    itself (not an ExceptionGroup), so callers can catch it by type."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in tasks:
        if not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]


async def download_ranges(
    path: str,
    total: int,
    chunk: int,
    concurrency: int,
    slots: asyncio.Semaphore,
    fetch: Callable[[int, int], Awaitable[bytes]],
    what: str,
) -> None:
    """Fetch ``[0, total)`` in ranges, several at once, ``pwrite`` each into a temporary file
    beside ``path``, fsync and rename: a failed download never leaves a torn file at ``path``."""
    tmp = temp_name(path)
    fd = await asyncio.to_thread(os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        await asyncio.to_thread(os.ftruncate, fd, total)
        starts = iter(range(0, total, chunk))

        async def worker() -> None:
            for start in starts:
                end = min(start + chunk, total)
                async with slots:
                    try:
                        data = await fetch(start, end)
                    except FileExistsError as e:  # If-Match failed: the object was replaced
                        raise IntegrityError(f"{what}: object changed during download") from e
                    if len(data) != end - start:
                        raise TransientStorageError(
                            f"{what}: range {start}-{end} returned {len(data)} bytes"
                        )
                    await asyncio.to_thread(_pwrite_all, fd, data, start)

        await run_all([worker() for _ in range(concurrency)])
        await asyncio.to_thread(os.fsync, fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


# -- reading straight into memory (Store.read_into) ---------------------------------------------


def part_spans(size: int, part: int) -> list[tuple[int, int]]:
    """``[0, size)`` cut into ``(start, end)`` pieces of ``part`` bytes (the last may be short)."""
    return [(a, min(a + part, size)) for a in range(0, size, part)]


def combine_crcs(crcs: list[tuple[int, int]]) -> int:
    """CRC32C of consecutive pieces given ``(crc, length)`` of each, in order."""
    value = 0
    for crc, n in crcs:
        value = crc32c_combine(value, crc, n)
    return value


async def read_ranges_into(
    buf: memoryview,
    offset: int,
    part: int,
    concurrency: int,
    fetch: Callable[[int, memoryview], Awaitable[int | None]],
    progress: ProgressFn | None = None,
    slots: asyncio.Semaphore | None = None,
) -> int:
    """Fill ``buf`` from object bytes ``[offset, offset + len(buf))`` in parts, up to
    ``concurrency`` at once (and, with ``slots``, within the store's own limit): ``fetch(start,
    view)`` fills ``view`` with the object's bytes from ``start`` (or raises). Each part's CRC32C
    is computed in a worker thread as soon as it has arrived (the ``crc32c`` package releases
    the GIL), overlapping the other parts' downloads; the CRCs are combined in order. A
    ``fetch`` that returns an int has computed the part's CRC32C itself (a local read does it
    in the thread that read it, while the part is still in the CPU's cache)."""
    buf = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
    spans = part_spans(len(buf), max(1, part))
    if not spans:
        return 0
    crcs: list[tuple[int, int]] = [(0, 0)] * len(spans)
    todo = iter(range(len(spans)))

    async def worker() -> None:
        for i in todo:
            a, b = spans[i]
            view = buf[a:b]
            if slots is None:
                crc = await fetch(offset + a, view)
            else:
                async with slots:
                    crc = await fetch(offset + a, view)
            if crc is None:
                crc = await asyncio.to_thread(_crc32c.crc32c, view)
            crcs[i] = (crc, b - a)
            if progress is not None:
                progress(b - a)

    await run_all([worker() for _ in range(min(concurrency, len(spans)))])
    return combine_crcs(crcs)


def parse_content_range(value: str | None) -> int | None:
    """The object's total size from a ``Content-Range: bytes A-B/TOTAL`` header, if stated."""
    if not value or "/" not in value:
        return None
    tail = value.rsplit("/", 1)[1].strip()
    return int(tail) if tail.isdigit() else None


async def fill_from_stream(
    read: Callable[[int], Awaitable[bytes]], view: memoryview, what: str
) -> None:
    """Copy a response body into ``view`` chunk by chunk as it arrives (``read(n)`` returns at
    most ``n`` bytes, ``b""`` at the end): the one copy from the socket's buffers, no big bytes.
    A body that ends early is a ``TransientStorageError`` (a cut connection: retry the part)."""
    pos = 0
    n = len(view)
    while pos < n:
        chunk = await read(min(n - pos, 1 << 20))
        if not chunk:
            raise TransientStorageError(f"{what}: body ended at byte {pos} of {n}")
        view[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
