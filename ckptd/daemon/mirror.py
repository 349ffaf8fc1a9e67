"""Mirror a run's experiment folder (logs, metrics, results) to ``<store>/<run>/experiment/``.

The trainer writes small files into its experiment folder; the daemon watches the folder
(watchdog, on its own thread) and uploads each file once it is complete: at once when the writer
closes it (inotify ``IN_CLOSE_WRITE``) or renames it into place, else after ``quiet_s`` without a
change. Files that are appended to for the whole run (``metrics.jsonl``, ``main.log``) never go
quiet, so a file dirty for ``max_delay_s`` is uploaded anyway: a crash loses at most that much.

Only regular files that lie inside the folder are mirrored, because the folder is written by code
the daemon does not trust (issue 14: a symlink uploaded a credentials file, a FIFO hung the daemon,
a link to ``/dev/zero`` filled the disk):

- A file is opened component by component from the folder with ``O_NOFOLLOW`` (``openat``), the
  last one with ``O_NONBLOCK`` too, and only after ``lstat`` says it is regular; the opened fd is
  ``fstat``-ed again and must be ``S_ISREG``. A symlink anywhere in the relative path, a FIFO, a
  socket or a device is skipped with one warning per path and never read (and a FIFO never
  blocks). Walking the folder never follows a symlinked directory.
- Every relative path that becomes a store key has each ``/``-separated part pass
  ``names.check_name`` and holds no control character; a bad name is skipped with a warning.
- A file larger than ``max_file_size`` (1 GiB by default) is skipped with a warning.
- Sparse files are skipped, not counted against the cap: a file of at least 1 MiB whose allocated
  blocks cover less than half of its size *and* whose holes (``SEEK_HOLE``) make up more than half
  of it. Records are dense; a sparse file in the folder is a preallocated or mmap'd scratch file,
  and uploading it would send its holes as zeros. Both tests are needed: compressed filesystems
  (btrfs, ZFS) report few blocks for dense files, but no holes.
- What is uploaded is what was checksummed: the store reads the very inode that was opened and
  checked (``/proc/self/fd/N`` on Linux, so a rename or a symlink swapped in meanwhile cannot
  redirect it), the checksum covers at most the size ``fstat`` reported at open, and the store
  verifies size and checksum of what it read. A file that changes while it is read or uploaded
  (the stores raise ``IntegrityError``, or its ``fstat`` differs afterwards) stays pending and is
  uploaded again after the next quiet period, never counted as done torn.
- Every upload has a bounded time (``upload_timeout_s``); one that runs out counts as failed (so a
  flush does not wait on it) and is retried on the next change or flush. ``stop(timeout)`` cancels
  what is still in flight when its time is up, so a hung store never holds up shutdown, and logs
  what was not uploaded (``pending()`` and ``failed`` still say so afterwards).

Skipped files are refusals, not failures: they are listed in ``skipped`` (path -> reason) and do
not make ``flush`` false. Files are never deleted from the store (records are history).
``Mirrors`` is what the daemon owns: one ``Mirror`` per run, driven by the socket op ``mirror``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import crc32c as _crc32c

from ..errors import CkptdError, ConfigError, IntegrityError, NotFoundError, StorageError
from ..names import check_name
from ..storage import Store, join_key
from ..storage.retry import with_retries

Transfer = Callable[[Callable[[], Awaitable[None]]], Awaitable[None]]
"""Runs one upload (a zero-argument coroutine function) and returns when it is done."""

log = logging.getLogger("ckptd.mirror")

SKIP_PATTERNS = ("*.tmp", "*~", ".#*", "*.swp", "*.swx", "*.tmp-*", "*.partial")
"""Editor and atomic-write temporaries: uploading them would only leave litter in the store."""

DEFAULT_MAX_FILE_SIZE = 1 << 30
"""Experiment records are logs and small results; a bigger file is almost surely not a record."""

SPARSE_MIN_SIZE = 1 << 20
"""Below this a sparse file costs little to upload, and small files have odd block counts."""

_CHUNK = 8 << 20
_MAX_SKIPPED = 10_000  # a folder of a million symlinks must not grow the daemon without bound
_FD_DIR = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else None
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOCTTY = getattr(os, "O_NOCTTY", 0)
_CLOSE_GRACE_S = 60.0
"""How long an fd outlives a cancelled upload: a store thread that has yet to reopen
``/proc/self/fd/N`` must find this file there, not whatever reuses the number next."""


def skipped(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in SKIP_PATTERNS)


def bad_name(rel: str) -> str | None:
    """Why the relative path ``rel`` may not become a store key, or None when it may.

    Each ``/``-separated part must pass the project's name rule (``names.check_name``). Control
    characters are named first, on their own, so that the warning says what is wrong; the rule
    refuses them too.
    """
    if rel.startswith("/"):
        return "an absolute path"
    for part in rel.split("/"):
        if part in ("", ".", ".."):
            return "an empty, '.' or '..' path component"
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in part):
            return "a control character in its name"
        try:
            check_name(part, "experiment file name")
        except ConfigError as e:
            return str(e)
    return None


def fd_crc32c(fd: int, size: int, what: str) -> int:
    """CRC32C of the first ``size`` bytes: an append after the ``fstat`` does not change it."""
    value = 0
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(_CHUNK, size - offset), offset)
        if not chunk:
            raise IntegrityError(f"{what} shrank while reading it")
        value = _crc32c.crc32c(chunk, value)
        offset += len(chunk)
    return value


class _Skip(Exception):
    """This path is not a regular file inside the folder: never read it."""


def _is_sparse(fd: int, st: os.stat_result) -> bool:
    """Mostly holes: few blocks allocated and ``SEEK_HOLE`` finds more holes than data."""
    size = st.st_size
    if size < SPARSE_MIN_SIZE or st.st_blocks * 512 >= size // 2:
        return False
    holes = 0
    offset = 0
    try:
        for _ in range(4096):  # bounded: a file of a million tiny extents is judged by a prefix
            if offset >= size:
                break
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                holes += size - offset  # no data after offset: the rest is one hole
                break
            holes += data - offset
            offset = os.lseek(fd, data, os.SEEK_HOLE)
    except (OSError, AttributeError):
        return False  # no SEEK_HOLE here: treat it as dense, the size cap still applies
    return holes > size // 2


class _RegularFile:
    """An open fd of a regular file inside the folder; closes it on every path.

    Opened one component at a time from the folder with ``O_NOFOLLOW``, so neither a symlinked
    directory nor a symlinked file can lead outside, and with ``O_NONBLOCK`` so that a FIFO that
    replaced the file after the ``lstat`` cannot block the open.
    """

    def __init__(self, top: str, rel: str) -> None:
        self.fd = -1
        parts = rel.split("/")
        dfd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC)
        try:
            for part in parts[:-1]:
                try:
                    nfd = os.open(
                        part,
                        os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _O_CLOEXEC,
                        dir_fd=dfd,
                    )
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise _Skip(f"{part!r} on its path is a symlink or not a directory") from e
                    raise
                os.close(dfd)
                dfd = nfd
            name = parts[-1]
            lst = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISLNK(lst.st_mode):
                raise _Skip("a symbolic link")
            if not stat.S_ISREG(lst.st_mode):
                raise _Skip("not a regular file (FIFO, socket, device or directory)")
            try:
                self.fd = os.open(
                    name,
                    os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC | _O_NOCTTY,
                    dir_fd=dfd,
                )
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENXIO, errno.ENOTDIR):
                    raise _Skip("replaced by something that is not a regular file") from e
                raise
        finally:
            os.close(dfd)
        try:
            self.st = os.fstat(self.fd)
            if not stat.S_ISREG(self.st.st_mode):
                raise _Skip("not a regular file")
        except BaseException:
            self.close()
            raise

    def store_path(self, fallback: str) -> str:
        """A path that names this very inode: the store reopens what was checked, nothing else."""
        return f"{_FD_DIR}/{self.fd}" if _FD_DIR is not None else fallback

    def changed(self) -> bool:
        """True when the file is no longer as ``fstat`` saw it at open (written meanwhile)."""
        now = os.fstat(self.fd)
        return _version(now) != _version(self.st)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> _RegularFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is not None and issubclass(kind, asyncio.CancelledError):
            # Threads working on this fd (our checksum, the store's reopen) may still run.
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_later(_CLOSE_GRACE_S, self.close)
                return
        self.close()


async def _open_regular(top: str, rel: str) -> _RegularFile:
    """Open in a thread; if the caller is cancelled meanwhile, the fd is closed, not leaked."""
    fut = asyncio.get_running_loop().run_in_executor(None, _RegularFile, top, rel)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(_close_opened)
        raise


def _close_opened(fut: asyncio.Future[_RegularFile]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().close()


def _version(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(slots=True)
class _Dirty:
    first: float  # monotonic time of the first change not yet uploaded
    last: float  # monotonic time of the latest change
    ready: bool  # closed or renamed into place: complete, upload now


class Mirror:
    """Watch a local experiment dir and upload changed files to <store>/<run>/experiment/."""

    def __init__(
        self,
        directory: str,
        store: Store,
        key_prefix: str,
        *,
        quiet_s: float = 0.5,
        max_delay_s: float = 30.0,
        concurrency: int = 4,
        attempts: int = 4,
        max_file_size: int | None = DEFAULT_MAX_FILE_SIZE,
        upload_timeout_s: float = 600.0,
        transfer: Transfer | None = None,
    ) -> None:
        """``max_file_size`` None means no cap; ``upload_timeout_s`` bounds one file's upload
        (open, checksum and every retry), so a hung store turns into a failure, not a hang.
        ``transfer``, when given, runs each upload (the daemon's upload queue, so records share
        its bound, its fair share between runs and its order under preemption); without it a
        mirror uploads by itself, ``concurrency`` files at a time."""
        if quiet_s < 0 or max_delay_s <= 0 or concurrency < 1:
            raise ConfigError("quiet_s >= 0, max_delay_s > 0 and concurrency >= 1 are required")
        if max_file_size is not None and max_file_size < 0:
            raise ConfigError(f"max_file_size must be >= 0 or None, not {max_file_size}")
        if upload_timeout_s <= 0:
            raise ConfigError(f"upload_timeout_s must be > 0, not {upload_timeout_s}")
        self.directory = os.path.realpath(directory)
        self.store = store
        self.key_prefix = key_prefix.strip("/")
        self.quiet_s = quiet_s
        self.max_delay_s = max_delay_s
        self.attempts = attempts
        self.max_file_size = max_file_size
        self.upload_timeout_s = upload_timeout_s
        self.uploads = 0
        """Files uploaded so far (tests and status read it)."""
        self.failed: dict[str, str] = {}
        """Relative path -> error of files whose last upload failed for good; retried on change."""
        self.skipped: dict[str, str] = {}
        """Relative path -> why it is not mirrored (symlink, not regular, name, size, sparse)."""
        self.noop = self._lies_in_store()
        self._warned: set[tuple[str, str]] = set()
        self._dirty: dict[str, _Dirty] = {}
        self._inflight: set[str] = set()
        self._uploaded: dict[str, tuple[int, int]] = {}  # rel -> (size, crc32c) last uploaded
        self._seen: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) at that upload
        self._sem = asyncio.Semaphore(concurrency)
        self._transfer = transfer
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._workers: set[asyncio.Task[None]] = set()
        self._stopped = False

    def _lies_in_store(self) -> bool:
        """True when the store is a local directory and this folder is already its copy."""
        from ..storage.local import LocalStore

        if not isinstance(self.store, LocalStore):
            return False
        target = os.path.realpath(os.path.join(self.store.root, *self.key_prefix.split("/")))
        return target == self.directory

    # ---- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the watchdog observer, then queue every file already there for upload."""
        if self.noop or self._task is not None:
            return
        if not os.path.isdir(self.directory):
            raise ConfigError(f"cannot mirror {self.directory}: not a directory")
        try:
            from watchdog.observers import Observer
        except ImportError as e:
            raise ConfigError(f"mirroring needs the watchdog package ({e})") from e

        self._loop = asyncio.get_running_loop()
        observer = Observer()
        observer.schedule(_handler(self), self.directory, recursive=True)
        observer.daemon = True
        await asyncio.to_thread(observer.start)
        self._observer = observer
        # Scan after the watch is in place: a file written in between is seen at least once.
        self._take(await asyncio.to_thread(self._scan, self.directory), ready=True)
        self._task = asyncio.create_task(self._run(), name=f"mirror:{self.key_prefix}")

    def pending(self) -> list[str]:
        """Files changed but not yet uploaded (relative paths), in flight included."""
        return sorted(set(self._dirty) | self._inflight)

    async def flush(self, timeout: float | None = None) -> bool:
        """Upload everything pending now; True when nothing is pending and nothing failed.

        Bounded even with ``timeout`` None: each upload has ``upload_timeout_s``, and one that
        fails (or runs out of time) is not waited for again within this flush.
        """
        if self.noop:
            return True
        if self._task is None:
            raise ConfigError("flush() before start()")
        deadline = None if timeout is None else time.monotonic() + timeout
        scan = asyncio.ensure_future(asyncio.to_thread(self._scan, self.directory))
        try:
            found = await asyncio.wait_for(asyncio.shield(scan), timeout)
        except TimeoutError:
            found = []  # a huge or hung folder: what is already pending is still flushed
            scan.add_done_callback(lambda f: f.cancelled() or f.exception())
        # Only what changed since its upload: an event may still be on its way.
        self._take(found, ready=True, changed_only=True)
        for rel in list(self.failed):
            self._mark(rel, ready=True)
        self.failed.clear()
        for d in self._dirty.values():
            d.ready = True
        self._wake.set()
        while self._dirty or self._inflight:
            if self.failed and all(r in self.failed for r in self._dirty) and not self._inflight:
                break  # only failures left: waiting longer will not help
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self._settled.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), timeout=left)
        return not self._dirty and not self._inflight and not self.failed

    async def stop(self, timeout: float | None = None) -> bool:
        """Flush within ``timeout``, then cancel what is still in flight and stop watching.

        Returns within ``timeout`` (plus a moment for the observer thread) even when a store call
        hangs; what was not uploaded stays in ``pending()`` and ``failed`` and is logged.
        """
        if self.noop or self._task is None or self._stopped:
            return not self.pending() and not self.failed
        deadline = None if timeout is None else time.monotonic() + timeout
        ok = False
        try:
            ok = await self.flush(timeout)
        finally:
            self._stopped = True
            left = 5.0 if deadline is None else min(5.0, max(0.1, deadline - time.monotonic()))
            observer, self._observer = self._observer, None
            if observer is not None:
                observer.stop()
                # join in a thread bounded by itself: a slow observer never outlives ``left``
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.to_thread(observer.join, left), left + 0.1)
            tasks = [self._task, *self._workers]
            for t in tasks:
                t.cancel()
            # A store that swallows the cancellation is left behind, not waited for.
            await asyncio.wait(tasks, timeout=max(0.1, left))
        if not ok:
            log.warning(
                "mirror %s stopped with files not uploaded: pending %s, failed %s",
                self.key_prefix,
                self.pending(),
                sorted(self.failed),
            )
        return ok

    # ---- events (on the loop) ------------------------------------------------------------------

    def _on_event(self, kind: str, path: str, dest: str | None) -> None:
        if self._stopped:
            return
        if kind == "moved" and dest is not None:
            path, kind = dest, "closed"  # renamed into place: complete
        if kind == "dir_created" or kind == "dir_moved":
            # Files may have landed before the watch did. Walk in a thread: a big tree moved in
            # must not hold up the loop that also serves saves.
            task = asyncio.create_task(self._scan_dir(path))
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)
            return
        rel = self._rel(path)
        if rel is None:
            return
        if kind == "deleted":
            self._dirty.pop(rel, None)
            self.failed.pop(rel, None)
            self.skipped.pop(rel, None)
            self._settle_check()
            return
        if kind in ("closed", "created", "modified"):
            self._mark(rel, ready=kind == "closed")

    async def _scan_dir(self, path: str) -> None:
        self._take(await asyncio.to_thread(self._scan, path), ready=False)

    def _rel(self, path: str) -> str | None:
        """The store-relative name of ``path``, or None for temporaries, outsiders, bad names."""
        rel = os.path.relpath(path, self.directory)
        parts = rel.split(os.sep)
        if rel == "." or parts[0] == ".." or os.path.isabs(rel):
            return None
        if any(skipped(p) for p in parts):
            return None
        rel = "/".join(parts)
        why = bad_name(rel)
        if why is not None:
            self._skip(rel, f"a name that cannot be a store key: {why}")
            return None
        return rel

    def _scan(self, top: str) -> list[tuple[str, str | None]]:
        """Files under ``top`` as (rel, None), or (rel, why) for what must be skipped.

        Runs in a thread, so it only reports; never follows a symlink, to a directory or a file.
        ``_RegularFile`` checks again at upload, so a race here cannot leak anything.
        """
        rel_top = os.path.relpath(top, self.directory)
        parts = [] if rel_top == "." else rel_top.split(os.sep)
        if parts and (parts[0] == ".." or os.path.isabs(rel_top)):
            return []
        here = self.directory
        for i, part in enumerate(parts):
            here = os.path.join(here, part)
            try:
                st = os.lstat(here)
            except OSError:
                return []
            if not stat.S_ISDIR(st.st_mode):
                why = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
                return [("/".join(parts[: i + 1]), why)]
        out: list[tuple[str, str | None]] = []
        stack = [top]
        while stack:
            d = stack.pop()
            try:
                with os.scandir(d) as it:
                    entries = list(it)
            except OSError:
                continue  # gone or unreadable: its events, if any, will say
            for e in entries:
                if e.is_symlink():
                    kind: str | None = "a symbolic link"
                elif e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                    continue
                elif e.is_file(follow_symlinks=False):
                    kind = None
                else:
                    kind = "not a regular file (FIFO, socket or device)"
                rel = os.path.relpath(e.path, self.directory).replace(os.sep, "/")
                if any(skipped(p) for p in rel.split("/")):
                    continue
                out.append((rel, kind))
        return out

    def _take(
        self, found: list[tuple[str, str | None]], *, ready: bool, changed_only: bool = False
    ) -> None:
        """Queue what a scan found (on the loop: it touches the mirror's state)."""
        if self._stopped:
            return
        for rel, why in found:
            if why is not None:
                self._skip(rel, why)
            elif self._rel(os.path.join(self.directory, rel)) is None:
                continue  # a temporary, or a bad name (``_rel`` warned)
            elif not changed_only or self._changed_since_upload(rel):
                self._mark(rel, ready=ready)

    def _skip(self, rel: str, why: str) -> None:
        """Record a path that is not mirrored; warn once per path and reason, not per event."""
        self._dirty.pop(rel, None)
        if rel in self.skipped or len(self.skipped) < _MAX_SKIPPED:
            self.skipped[rel] = why
        if (rel, why) not in self._warned and len(self._warned) < _MAX_SKIPPED:
            self._warned.add((rel, why))
            log.warning("mirror %s: not uploading %r: %s", self.key_prefix, rel, why)
        self._settle_check()

    def _mark(self, rel: str, *, ready: bool) -> None:
        now = time.monotonic()
        d = self._dirty.get(rel)
        if d is None:
            self._dirty[rel] = _Dirty(now, now, ready)
        else:
            d.last = now
            d.ready = d.ready or ready
        self.failed.pop(rel, None)
        self._wake.set()

    def _changed_since_upload(self, rel: str) -> bool:
        try:
            st = os.stat(os.path.join(self.directory, rel), follow_symlinks=False)
        except FileNotFoundError:
            return False
        return self._seen.get(rel) != (st.st_size, st.st_mtime_ns)

    def _settle_check(self) -> None:
        if not self._inflight and (not self._dirty or all(r in self.failed for r in self._dirty)):
            self._settled.set()

    # ---- the upload loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            next_due: float | None = None
            for rel, d in list(self._dirty.items()):
                if rel in self._inflight or rel in self.failed:
                    continue
                due = now if d.ready else min(d.last + self.quiet_s, d.first + self.max_delay_s)
                if due <= now:
                    del self._dirty[rel]
                    self._inflight.add(rel)
                    task = asyncio.create_task(self._upload(rel, d))
                    self._workers.add(task)
                    task.add_done_callback(self._workers.discard)
                else:
                    next_due = due if next_due is None else min(next_due, due)
            self._settle_check()
            self._wake.clear()
            timeout = None if next_due is None else max(0.0, next_due - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)

    async def _upload(self, rel: str, d: _Dirty) -> None:
        path = os.path.join(self.directory, *rel.split("/"))
        key = join_key(self.key_prefix, rel)
        try:
            await asyncio.wait_for(self._upload_one(rel, path, key), self.upload_timeout_s)
        except _Skip as e:
            self._skip(rel, str(e))
        except (IntegrityError, NotFoundError, FileNotFoundError) as e:
            # Changed or replaced while reading it: take it again after the next quiet period.
            log.debug("mirror %r: %s; trying again", rel, e)
            if os.path.lexists(path):
                now = time.monotonic()  # a fresh quiet period, not an immediate retry
                self._dirty.setdefault(rel, _Dirty(now, now, False))
        except TimeoutError:
            log.warning(
                "could not mirror %r to %s: no answer within %.0f s",
                rel,
                key,
                self.upload_timeout_s,
            )
            self.failed[rel] = f"timed out after {self.upload_timeout_s:g} s"
            self._dirty.setdefault(rel, _Dirty(d.first, time.monotonic(), False))
        except (StorageError, CkptdError, OSError) as e:
            log.warning("could not mirror %r to %s: %s", rel, key, e)
            self.failed[rel] = str(e)
            self._dirty.setdefault(rel, _Dirty(d.first, time.monotonic(), False))
        except asyncio.CancelledError:
            self._dirty.setdefault(rel, d)  # stopped mid-upload: still not in the store
            raise
        finally:
            self._inflight.discard(rel)
            self._wake.set()
            self._settle_check()

    async def _upload_one(self, rel: str, path: str, key: str) -> None:
        """Open, check and checksum the file, then have the store read that same inode."""
        try:
            f = await _open_regular(self.directory, rel)
        except FileNotFoundError:
            return  # deleted before we got to it: nothing to mirror
        with f:
            st = f.st
            size = st.st_size
            if self.max_file_size is not None and size > self.max_file_size:
                raise _Skip(f"{size} bytes, over the mirror's cap of {self.max_file_size} bytes")
            if await asyncio.to_thread(_is_sparse, f.fd, st):
                raise _Skip(
                    f"a sparse file ({size} bytes, {st.st_blocks * 512} allocated): "
                    "its holes would upload as zeros"
                )
            crc = await asyncio.to_thread(fd_crc32c, f.fd, size, path)
            if await asyncio.to_thread(f.changed):
                raise IntegrityError(f"{path} changed while reading it")
            if self._uploaded.get(rel) == (size, crc):
                self._seen[rel] = (size, st.st_mtime_ns)
                self.skipped.pop(rel, None)
                return  # same content as uploaded (a rescan, a rewrite of the same bytes)
            source = f.store_path(path)

            async def put() -> None:
                await self.store.put_file(key, source, size=size, crc32c=crc)

            async def attempt() -> None:
                await with_retries(put, what=f"mirror {key}", attempts=self.attempts)

            if self._transfer is not None:
                await self._transfer(attempt)
            else:
                async with self._sem:
                    await attempt()
            changed = await asyncio.to_thread(f.changed)
        self._uploaded[rel] = (size, crc)
        self._seen[rel] = (size, st.st_mtime_ns)
        self.skipped.pop(rel, None)
        self.uploads += 1
        log.debug("mirrored %r -> %s (%d bytes)", rel, key, size)
        if changed:  # the store verified what it read, but the file moved on: take it again
            now = time.monotonic()
            self._dirty.setdefault(rel, _Dirty(now, now, False))


def _handler(mirror: Mirror) -> Any:
    """A watchdog handler (imported here: only a daemon that mirrors needs watchdog)."""
    from watchdog.events import FileSystemEventHandler

    class Handler(FileSystemEventHandler):
        """Runs on watchdog's thread; hands every event to the loop as is."""

        def dispatch(self, event: Any) -> None:
            kind = str(event.event_type)
            if event.is_directory:
                if kind not in ("created", "moved"):
                    return
                kind = f"dir_{kind}"
                path = str(event.dest_path) if kind == "dir_moved" else str(event.src_path)
                dest = None
            else:
                if kind not in ("closed", "created", "modified", "moved", "deleted"):
                    return
                path = str(event.src_path)
                dest = str(event.dest_path) if kind == "moved" else None
            loop = mirror._loop
            if loop is None:
                return
            with contextlib.suppress(RuntimeError):  # the loop is closing: nothing left to tell
                loop.call_soon_threadsafe(mirror._on_event, kind, path, dest)

    return Handler()


class Mirrors:
    """The daemon's mirrors, one per run, behind the socket op ``mirror``.

    Request: ``{"op": "mirror", "rid", "run", "dir", "store", "action", "timeout"}`` with
    ``action`` one of ``start`` (idempotent), ``flush`` (start if needed, then upload all pending
    within ``timeout``; 0 = do not wait) and ``stop`` (flush, stop watching). Reply:
    ``{"ev": "mirror", "rid", "ok", "active", "pending", "failed", "skipped"}``; ``active`` is
    False when the folder already lies in the store (nothing to do); ``skipped`` maps the paths
    that are never mirrored (symlinks, FIFOs, bad names, over the cap, sparse) to why.
    ``kwargs`` go to every ``Mirror`` (``max_file_size``, ``upload_timeout_s``, ...).
    """

    def __init__(
        self, store_for: Callable[[str], Store], default_store: str, **kwargs: Any
    ) -> None:
        self._store_for = store_for
        self._default_store = default_store
        self._kwargs = kwargs
        self._mirrors: dict[str, Mirror] = {}
        self._owners: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    async def handle(self, msg: dict[str, Any], *, client: int | None = None) -> dict[str, Any]:
        run = msg.get("run")
        directory = msg.get("dir")
        action = msg.get("action", "start")
        timeout = msg.get("timeout")
        if not isinstance(run, str) or not isinstance(directory, str):
            raise ConfigError("mirror needs 'run' and 'dir' strings")
        check_name(run, "run")
        if not os.path.isabs(directory):
            raise ConfigError(f"mirror dir must be absolute, not {directory!r}")
        if action not in ("start", "flush", "stop"):
            raise ConfigError(f"mirror action must be start, flush or stop, not {action!r}")
        if timeout is not None and not isinstance(timeout, int | float):
            raise ConfigError("mirror timeout must be a number")
        mirror = self._mirrors.get(run)
        if mirror is not None and mirror.directory != os.path.realpath(directory):
            raise ConfigError(f"run {run} is already mirrored from {mirror.directory}")
        if mirror is None:
            if action == "stop":
                return {
                    "ev": "mirror",
                    "ok": True,
                    "active": False,
                    "pending": [],
                    "failed": {},
                    "skipped": {},
                }
            store_url = msg.get("store") or self._default_store
            if not isinstance(store_url, str):
                raise ConfigError("mirror store must be a URL string")
            kwargs = dict(self._kwargs)
            if (transfer := kwargs.pop("transfer", None)) is not None:
                kwargs["transfer"] = functools.partial(transfer, run)
            mirror = Mirror(
                directory, self._store_for(store_url), join_key(run, "experiment"), **kwargs
            )
            await mirror.start()
            self._mirrors[run] = mirror
        if client is not None:
            self._owners[run] = client
        ok = not mirror.pending()
        if action == "flush":
            ok = await mirror.flush(timeout)
        elif action == "stop":
            ok = await mirror.stop(timeout)
            self._mirrors.pop(run, None)
            self._owners.pop(run, None)
        return {
            "ev": "mirror",
            "ok": ok,
            "active": not mirror.noop,
            "pending": mirror.pending(),
            "failed": dict(mirror.failed),
            "skipped": dict(mirror.skipped),
        }

    def release(self, client: int) -> None:
        """The client that asked went away (finished or crashed): flush its mirrors and stop."""
        for run, owner in list(self._owners.items()):
            if owner == client:
                del self._owners[run]
                mirror = self._mirrors.pop(run, None)
                if mirror is not None:
                    task = asyncio.create_task(mirror.stop(self._kwargs.get("max_delay_s", 30.0)))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    def pending(self) -> dict[str, list[str]]:
        return {run: p for run, m in self._mirrors.items() if (p := m.pending() + sorted(m.failed))}

    async def flush_all(self, timeout: float | None) -> bool:
        """Flush every mirror (the drain's share); True when all are empty."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        results = await asyncio.gather(*(m.flush(timeout) for m in self._mirrors.values()))
        return all(results) and not self._tasks

    async def stop_all(self, timeout: float | None) -> bool:
        ok = await self.flush_all(timeout)
        mirrors, self._mirrors = list(self._mirrors.values()), {}
        results = await asyncio.gather(*(m.stop(0) for m in mirrors))
        return ok and all(results)
