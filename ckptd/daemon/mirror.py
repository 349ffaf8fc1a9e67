"""Mirror a run's experiment folder (logs, metrics, results) to ``<store>/<run>/experiment/``.

The trainer writes small files into its experiment folder; the daemon watches the folder
(watchdog, on its own thread) and uploads each file once it is complete: at once when the writer
closes it (inotify ``IN_CLOSE_WRITE``) or renames it into place, else after ``quiet_s`` without a
change. Files that are appended to for the whole run (``metrics.jsonl``, ``main.log``) never go
quiet, so a file dirty for ``max_delay_s`` is uploaded anyway: a crash loses at most that much.

A file that grows during its upload makes the store raise ``IntegrityError``; it stays pending and
is tried again after the next quiet period. Files are never deleted from the store (records are
history). ``Mirrors`` is what the daemon owns: one ``Mirror`` per run, driven by the socket op
``mirror``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import crc32c as _crc32c

from ..errors import CkptdError, ConfigError, IntegrityError, NotFoundError, StorageError
from ..names import check_name
from ..storage import Store, join_key
from ..storage.retry import with_retries

log = logging.getLogger("ckptd.mirror")

SKIP_PATTERNS = ("*.tmp", "*~", ".#*", "*.swp", "*.swx", "*.tmp-*", "*.partial")
"""Editor and atomic-write temporaries: uploading them would only leave litter in the store."""

_CHUNK = 8 << 20


def skipped(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in SKIP_PATTERNS)


def file_crc32c(path: str, size: int) -> int:
    """CRC32C of the first ``size`` bytes: an append after the ``stat`` does not change it."""
    value = 0
    left = size
    with open(path, "rb", buffering=0) as f:
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise IntegrityError(f"{path} shrank while reading it")
            value = _crc32c.crc32c(chunk, value)
            left -= len(chunk)
    return value


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
    ) -> None:
        if quiet_s < 0 or max_delay_s <= 0 or concurrency < 1:
            raise ConfigError("quiet_s >= 0, max_delay_s > 0 and concurrency >= 1 are required")
        self.directory = os.path.realpath(directory)
        self.store = store
        self.key_prefix = key_prefix.strip("/")
        self.quiet_s = quiet_s
        self.max_delay_s = max_delay_s
        self.attempts = attempts
        self.uploads = 0
        """Files uploaded so far (tests and status read it)."""
        self.failed: dict[str, str] = {}
        """Relative path -> error of files whose last upload failed for good; retried on change."""
        self.noop = self._lies_in_store()
        self._dirty: dict[str, _Dirty] = {}
        self._inflight: set[str] = set()
        self._uploaded: dict[str, tuple[int, int]] = {}  # rel -> (size, crc32c) last uploaded
        self._seen: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) at that upload
        self._sem = asyncio.Semaphore(concurrency)
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
        for rel in await asyncio.to_thread(self._scan, self.directory):
            self._mark(rel, ready=True)
        self._task = asyncio.create_task(self._run(), name=f"mirror:{self.key_prefix}")

    def pending(self) -> list[str]:
        """Files changed but not yet uploaded (relative paths), in flight included."""
        return sorted(set(self._dirty) | self._inflight)

    async def flush(self, timeout: float | None = None) -> bool:
        """Upload everything pending now; True when nothing is pending and nothing failed."""
        if self.noop:
            return True
        if self._task is None:
            raise ConfigError("flush() before start()")
        for rel in await asyncio.to_thread(self._scan, self.directory):
            if self._changed_since_upload(rel):  # an event may still be on its way
                self._mark(rel, ready=True)
        for rel in list(self.failed):
            self._mark(rel, ready=True)
        self.failed.clear()
        for d in self._dirty.values():
            d.ready = True
        self._wake.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._dirty or self._inflight:
            if self.failed and all(r in self.failed for r in self._dirty) and not self._inflight:
                break  # only permanent failures left: waiting longer will not help
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self._settled.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), timeout=left)
        return not self._dirty and not self._inflight and not self.failed

    async def stop(self, timeout: float | None = None) -> bool:
        """Flush (within ``timeout``), then stop the observer. Returns what ``flush`` returned."""
        if self.noop or self._task is None or self._stopped:
            return not self.pending() and not self.failed
        try:
            ok = await self.flush(timeout)
        finally:
            self._stopped = True
            observer, self._observer = self._observer, None
            if observer is not None:
                observer.stop()
                await asyncio.to_thread(observer.join, 5)
            self._task.cancel()
            for t in list(self._workers):
                t.cancel()
            await asyncio.gather(self._task, *self._workers, return_exceptions=True)
        if not ok:
            log.warning(
                "mirror %s stopped with files not uploaded: %s", self.key_prefix, self.pending()
            )
        return ok

    # ---- events (on the loop) ------------------------------------------------------------------

    def _on_event(self, kind: str, path: str, dest: str | None) -> None:
        if self._stopped:
            return
        if kind == "moved" and dest is not None:
            path, kind = dest, "closed"  # renamed into place: complete
        if kind == "dir_created" or kind == "dir_moved":
            for rel in self._scan(path):  # files may have landed before the watch did
                self._mark(rel, ready=False)
            return
        rel = self._rel(path)
        if rel is None:
            return
        if kind == "deleted":
            self._dirty.pop(rel, None)
            self.failed.pop(rel, None)
            self._settle_check()
            return
        if kind in ("closed", "created", "modified"):
            self._mark(rel, ready=kind == "closed")

    def _rel(self, path: str) -> str | None:
        rel = os.path.relpath(path, self.directory)
        if rel.startswith("..") or rel == ".":
            return None
        if any(skipped(p) for p in rel.split(os.sep)):
            return None
        return rel.replace(os.sep, "/")

    def _scan(self, top: str) -> list[str]:
        out = []
        for dirpath, _, filenames in os.walk(top):
            for name in filenames:
                rel = self._rel(os.path.join(dirpath, name))
                if rel is not None:
                    out.append(rel)
        return out

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
            st = os.stat(os.path.join(self.directory, rel))
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
            async with self._sem:
                try:
                    st = await asyncio.to_thread(os.stat, path)
                except FileNotFoundError:
                    return  # deleted before we got to it: nothing to mirror
                crc = await asyncio.to_thread(file_crc32c, path, st.st_size)
                if self._uploaded.get(rel) == (st.st_size, crc):
                    self._seen[rel] = (st.st_size, st.st_mtime_ns)
                    return  # same content as uploaded (a rescan, a rewrite of the same bytes)

                async def put() -> None:
                    await self.store.put_file(key, path, size=st.st_size, crc32c=crc)

                await with_retries(put, what=f"mirror {key}", attempts=self.attempts)
            self._uploaded[rel] = (st.st_size, crc)
            self._seen[rel] = (st.st_size, st.st_mtime_ns)
            self.uploads += 1
            log.debug("mirrored %s -> %s (%d bytes)", rel, key, st.st_size)
        except (IntegrityError, NotFoundError, FileNotFoundError) as e:
            # Changed or replaced while reading it: take it again after the next quiet period.
            log.debug("mirror %s: %s; trying again", rel, e)
            if os.path.exists(path):
                now = time.monotonic()  # a fresh quiet period, not an immediate retry
                self._dirty.setdefault(rel, _Dirty(now, now, False))
        except (StorageError, CkptdError, OSError) as e:
            log.warning("could not mirror %s to %s: %s", path, key, e)
            self.failed[rel] = str(e)
            self._dirty.setdefault(rel, _Dirty(d.first, time.monotonic(), False))
        finally:
            self._inflight.discard(rel)
            self._wake.set()
            self._settle_check()


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
    ``{"ev": "mirror", "rid", "ok", "active", "pending", "failed"}``; ``active`` is False when the
    folder already lies in the store (nothing to do).
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
                return {"ev": "mirror", "ok": True, "active": False, "pending": [], "failed": {}}
            store_url = msg.get("store") or self._default_store
            if not isinstance(store_url, str):
                raise ConfigError("mirror store must be a URL string")
            mirror = Mirror(
                directory, self._store_for(store_url), join_key(run, "experiment"), **self._kwargs
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
