"""The upload stage: one queue for every committed checkpoint, every rank's part and every
experiment record the mirror uploads.

Order: the run served least recently first (fair share between runs); under a preemption
notice, the newest checkpoint first (records after every checkpoint), and waiting uploads that
a newer committed checkpoint of the run supersedes are dropped (their local copies stay). At most
``uploads`` items are in flight, whatever their kind.

Retries, one layer per operation: each store request is retried by the store itself (typed
transient errors, backoff with jitter, counted in ``status`` per store); a checkpoint whose
upload still failed goes back to this queue after a backoff, resuming from its journal. Why is
recorded on the job (``reasons``: ``reason``, ``reason_since``, ``attempts``, ``error``) and
logged once per checkpoint per ``LOG_INTERVAL``. A store that may be back any moment (down,
5xx) is tried again after 2 s doubling to 60 s; one that said no (bucket missing, access
denied) after 30 s doubling to 5 min, for as long as the daemon lives (a bucket can be created
again), and at once when a drain asks (``recheck``). Only what no store can fix ends the job:
the tag is another writer's, or a committed file no longer matches its manifest.
``ckptd abandon`` gives an upload up on purpose (``abandon``; ``watch_abandoned`` notices it).
After an upload, retention runs for the run (``retain``), in the store and then in the root.

Policy (``committed``): with ``upload_every`` K, only every K-th committed checkpoint of a run
is queued; the others are "local only" (no upload record, not pending, local retention may
delete them). The newest checkpoint of a run is uploaded anyway at a drain, at SIGTERM and on
a preemption notice (``owe_newest``), and every commit during a drain is uploaded, so a drain
never leaves the newest checkpoint local only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .. import retention
from ..errors import (
    AlreadyExistsError,
    CkptdError,
    IntegrityError,
    StorageError,
)
from ..progress import human_bytes, human_duration
from ..protocol import Failed
from . import reasons
from .abandon import abandoned_tags, is_abandoned
from .bandwidth import TokenBucket, human_rate
from .commit import checkpoint_dir
from .config import DaemonConfig
from .jobs import Job, JobState, JobTable, Stats
from .logthrottle import Throttle, suppressed_note
from .stores import StoreSet
from .upload import clear_record, pending_records, upload_checkpoint, write_record

log = logging.getLogger("ckptd.daemon")

MAX_BACKOFF = 60.0
PERMANENT_BACKOFF = 30.0  # first re-check after a permanent error (a bucket that is missing) ...
PERMANENT_MAX_BACKOFF = 300.0  # ... doubling up to this, for as long as the daemon lives
LOG_INTERVAL = 30.0  # one failure line per checkpoint per this many seconds
ABANDON_POLL = 1.0  # how often pending uploads are checked for an abandon marker
RECHECK_MIN_S = 2.0  # a drain re-checks a refused upload at once, but not more often than this


@dataclass(eq=False, slots=True)
class Record:
    """One experiment file the mirror uploads, waiting for a worker like a checkpoint."""

    run: str
    upload: Callable[[], Awaitable[None]]
    done: asyncio.Future[None]
    step: int = -1  # behind every checkpoint under preemption


async def _once(fn: Callable[[], Awaitable[Any]], *, what: str) -> Any:
    """No retry at this layer: the store retried each request already."""
    return await fn()


class UploadStage:
    def __init__(
        self,
        cfg: DaemonConfig,
        jobs: JobTable,
        stores: StoreSet,
        stats: Stats,
        *,
        spawn: Callable[..., asyncio.Task[Any]],
        upload_part: Callable[[Job, Callable[[int], None]], Awaitable[None]],
        orphaned: Callable[[Job], Awaitable[bool]],
    ) -> None:
        self.cfg = cfg
        self.jobs = jobs
        self.stores = stores
        self.stats = stats
        self._spawn = spawn
        self._upload_part = upload_part
        self._orphaned = orphaned
        self.queue: list[Job | Record] = []
        self._wake = asyncio.Event()
        self._served: dict[str, float] = {}  # run -> when its last upload started
        self._saves: dict[str, int] = {}  # run -> whole saves admitted since start
        self._nth: dict[str, int] = {}  # job key -> its number among its run's saves
        self._draining = 0  # drains in progress: every commit meanwhile is uploaded
        self.preempted = False
        self._inflight: dict[str, asyncio.Task[None]] = {}  # job key -> its running upload
        self._abandoning: set[str] = set()
        self._log_throttle = Throttle(LOG_INTERVAL)
        self._watcher: asyncio.Task[Any] | None = None
        self._recheck: set[str] = set()  # keys whose slow backoff a drain cut short
        self._failed_at: dict[str, float] = {}  # key -> monotonic time of its last failure
        self._blob_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )  # store key of a shared blob -> the upload that puts it
        self._retaining: dict[str, asyncio.Lock] = {}  # run -> its retention pass
        if cfg.upload_limit is not None:  # one budget for every upload of this daemon
            stores.limit(TokenBucket(cfg.upload_limit).acquire)
            log.info("uploads limited to %s in all", human_rate(cfg.upload_limit))

    # ---- the queue -----------------------------------------------------------------------------

    def enqueue(self, job: Job | Record) -> None:
        if self._watcher is None and isinstance(job, Job):  # started with the first upload
            self._watcher = self._spawn(self.watch_abandoned())
        if job not in self.queue:
            self.queue.append(job)
            self._wake.set()

    async def transfer(self, run: str, upload: Callable[[], Awaitable[None]]) -> None:
        """Run one record upload through the queue; returns (or raises) when it is done."""
        record = Record(run, upload, asyncio.get_running_loop().create_future())
        self.enqueue(record)
        try:
            await asyncio.shield(record.done)
        except asyncio.CancelledError:
            if record in self.queue:
                self.queue.remove(record)
            record.done.cancel()
            raise

    # ---- the upload policy (--upload-every K) ------------------------------------------------

    def admitted(self, job: Job) -> None:
        """Number a whole save of a run as it arrives: commits finish out of order (several
        writers), so "every K-th" counts saves in the order the trainer made them."""
        if job.part is None and self.cfg.upload_every > 1:
            self._nth[job.key] = self._saves[job.run] = self._saves.get(job.run, 0) + 1

    async def committed(self, job: Job) -> None:
        """A whole checkpoint for a remote store is committed locally: queue its upload, or keep
        it local only when it is not a K-th one and no drain or preemption wants it."""
        n = self._nth.pop(job.key, 0)  # 0: not numbered (K is 1): upload
        if n % self.cfg.upload_every == 0 or self._must_upload():
            self.enqueue(job)
            return
        job.state = JobState.LOCAL_ONLY
        await asyncio.to_thread(clear_record, self.cfg.root, job.run, job.tag)
        log.info("kept %s local only (uploading every %d-th checkpoint)", job.key,
                 self.cfg.upload_every)  # fmt: skip
        await self.jobs.changed()

    def _must_upload(self) -> bool:
        return self.preempted or self.jobs.closing or self._draining > 0

    @contextlib.contextmanager
    def draining(self) -> Any:
        """While a drain runs, every commit is uploaded (the last one may be the newest)."""
        self.recheck()
        self._draining += 1
        try:
            yield
        finally:
            self._draining -= 1

    async def owe_newest(self) -> list[Job]:
        """Queue the newest committed checkpoint of each run if it was kept local only."""
        newest: dict[str, Job] = {}
        for j in self.jobs.values():
            whole = j.part is None and j.committed_at is not None and j.state != JobState.FAILED
            if whole and (j.run not in newest or j.step > newest[j.run].step):
                newest[j.run] = j
        owed = [j for j in newest.values() if j.state == JobState.LOCAL_ONLY and j.store]
        for job in owed:
            assert job.store is not None
            # On disk first: a daemon killed during the drain still owes it after a restart.
            await asyncio.to_thread(write_record, self.cfg.root, job.run, job.tag, job.store)
            job.state = JobState.COMMITTED
            log.info("uploading %s after all: it is the newest checkpoint of %s", job.key, job.run)
            self.enqueue(job)
        return owed

    def _next(self) -> Job | Record | None:
        if self.preempted:
            self.drop_superseded()
        if not self.queue:
            return None
        if self.preempted:
            job = max(self.queue, key=lambda j: j.step)
        else:
            job = min(self.queue, key=lambda j: self._served.get(j.run, 0.0))
        self.queue.remove(job)
        self._served[job.run] = time.monotonic()
        return job

    def drop_superseded(self) -> None:
        """Under preemption, skip uploads that a newer committed checkpoint of the run supersedes.

        Only waiting uploads are dropped (an upload in flight finishes); the local copy stays.
        """
        newest: dict[str, int] = {}
        for j in self.jobs.values():
            if j.committed_at is not None and j.state != JobState.FAILED:
                newest[j.run] = max(newest.get(j.run, -1), j.step)
        for j in self.jobs.values():
            if j.part is not None:  # a sharded save's commit waits for it: never drop one
                continue
            if j.state == JobState.COMMITTED and j.store and j.step < newest.get(j.run, -1):
                if j in self.queue:
                    self.queue.remove(j)
                j.state = JobState.DROPPED
                j.error = "superseded by a newer checkpoint during preemption (local copy kept)"
                clear_record(self.cfg.root, j.run, j.tag)
                log.warning("dropped upload of %s: a newer checkpoint supersedes it", j.key)

    # ---- the workers ---------------------------------------------------------------------------

    async def worker(self) -> None:
        while True:
            job = self._next()
            if job is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            if isinstance(job, Record):
                await self._record(job)
            else:
                await self._upload(job)

    @staticmethod
    async def _record(record: Record) -> None:
        if record.done.done():  # its mirror gave up waiting (stopped, timed out)
            return
        task = asyncio.ensure_future(record.upload())
        record.done.add_done_callback(lambda _: task.cancel())  # cancelled with its waiter
        try:
            await task
        except asyncio.CancelledError:
            if not record.done.done():
                record.done.cancel()
            if not task.cancelled():
                raise
        except Exception as e:  # noqa: BLE001 - handed to the waiting mirror, which decides by type
            if not record.done.done():
                record.done.set_exception(e)
        else:
            if not record.done.done():
                record.done.set_result(None)

    async def _upload(self, job: Job) -> None:
        assert job.store is not None
        job.state = JobState.UPLOADING
        attempt_started = time.time()
        job.upload_started = job.upload_started or attempt_started
        job.retry_at = None
        job.bytes_uploaded = 0

        def progress(n: int) -> None:
            job.bytes_uploaded += n
            self.stats.bytes_uploaded += n

        try:
            if job.part is not None:
                if await self._orphaned(job):
                    return
                await self._upload_part(job, progress)
            else:
                if not job.bytes_total:  # a checkpoint owed from before a restart
                    job.bytes_total = await asyncio.to_thread(_manifest_bytes, self.cfg.root, job)
                if not await self._cancellable(job, self._upload_whole(job, progress)):
                    return  # abandoned meanwhile (``_abandon`` ended the job)
        except (AlreadyExistsError, IntegrityError) as e:
            # Retrying cannot help: the tag is another writer's, or a committed file no longer
            # matches its manifest. Say so once; keep the local copy.
            error = f"upload of {job.key} to {job.store} failed: {e}"
            reasons.note(job, e, error)
            log.error("%s (the local copy stays in %s)", error, self.cfg.root)
            await self.jobs.fail(job, error)
            return
        except (StorageError, CkptdError, OSError) as e:
            # Everything else is tried again while the daemon lives: quickly when the store may
            # be back any moment, slowly when it said no (a bucket can be created again).
            self._failed(job, e)
            return
        self._log_throttle.forget(job.key)
        self._failed_at.pop(job.key, None)
        job.error = None
        reasons.clear(job)
        now = time.time()
        total = max(job.bytes_uploaded, job.bytes_total)
        took = max(now - attempt_started, 1e-6)
        waited = f", {human_duration(now - job.upload_started)} since the first attempt" if (
            job.retries and job.upload_started) else ""  # fmt: skip
        log.info(
            "uploaded %s to %s: %s (%s sent now) in %.1f s (%s/s), %d retries%s",
            job.key, job.store, human_bytes(total), human_bytes(job.bytes_uploaded), took,
            human_bytes(job.bytes_uploaded / took), job.retries, waited,
        )  # fmt: skip
        await self.jobs.finish(job)
        if job.part is None:
            self.retain(job)

    async def _upload_whole(self, job: Job, progress: Callable[[int], None]) -> None:
        assert job.store is not None
        await upload_checkpoint(
            self.stores.get(job.store),
            self.cfg.root,
            job.run,
            job.tag,
            file_concurrency=self.cfg.file_concurrency,
            progress=progress,
            with_retries=_once,
            blob_lock=lambda key: self._blob_lock(f"{job.store}\n{key}"),
            skipped=lambda n: self._skipped(job, n),
            refs=job.blobs,
        )
        await self.stores.advance_latest(job.store, job.run, job.tag, job.step)
        await asyncio.to_thread(clear_record, self.cfg.root, job.run, job.tag)

    async def _cancellable(self, job: Job, work: Awaitable[None]) -> bool:
        """Run ``work`` as a task that ``_abandon`` may cancel; False if it was abandoned."""
        task = asyncio.ensure_future(work)
        self._inflight[job.key] = task
        try:
            await task
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if job.key in self._abandoning and not (me is not None and me.cancelling()):
                return False
            raise
        finally:
            self._inflight.pop(job.key, None)
        return True

    def _failed(self, job: Job, e: BaseException) -> None:
        """One failed attempt: record why, log it (rate-limited), try again after a backoff."""
        error = f"upload of {job.key} to {job.store} interrupted: {reasons.one_line(e)}"
        changed = reasons.note(job, e, error)
        job.state = JobState.COMMITTED
        job.retries += 1
        reason = reasons.Reason(job.reason)
        if reason in reasons.PERMANENT:
            delay = min(PERMANENT_MAX_BACKOFF, PERMANENT_BACKOFF * 2 ** min(job.attempts - 1, 4))
        else:
            delay = min(MAX_BACKOFF, 2.0 ** min(job.retries, 6))
        job.retry_at = time.time() + delay
        self._failed_at[job.key] = time.monotonic()
        if changed and reason in reasons.PERMANENT:
            # The saver hears of it now, as of a failure (its handle stops waiting); the daemon
            # keeps the upload owed and re-checks it slowly, in case the store is fixed.
            self.jobs.send(job, Failed(id=job.save_id or 0, error=(
                f"{error} ({reason}; the daemon re-checks every {PERMANENT_BACKOFF:.0f} s to "
                f"{PERMANENT_MAX_BACKOFF / 60:.0f} min while it runs; the local copy stays)")))  # fmt: skip
        if changed:
            self._log_throttle.forget(job.key)
        held = self._log_throttle.allow(job.key)
        if held is not None:
            since = time.time() - (job.reason_since or time.time())
            log.warning(
                "%s not in %s: %s for %s (%d attempt%s), next try in %.0f s: %s%s",
                job.key, job.store, reason, human_duration(since), job.attempts,
                "" if job.attempts == 1 else "s", delay, error,
                suppressed_note(held, self._log_throttle.interval),
            )  # fmt: skip
        self._spawn(self._requeue_later(job, delay, slow=reason in reasons.PERMANENT))

    async def _requeue_later(self, job: Job, delay: float, *, slow: bool = False) -> None:
        deadline = time.monotonic() + delay
        # A shutdown that starts meanwhile shortens the wait: the network may be back already.
        # Not for a store that said no: that is re-checked on its own slow schedule.
        while time.monotonic() < deadline and not (self.jobs.closing and delay > 2 and not slow):
            await asyncio.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
            if job.key in self._abandoning:
                return
            if job.key in self._recheck:
                break
        self._recheck.discard(job.key)
        if job.pending:
            job.retry_at = None
            self.enqueue(job)

    def recheck(self) -> None:
        """Someone asks for a drain, perhaps after fixing the store: try the uploads a store
        refused now rather than at the end of their long backoff (each at most once per
        ``RECHECK_MIN_S``). The drain then waits for that attempt (``retry_at`` is cleared)."""
        now = time.monotonic()
        for job in self.jobs.values():
            if (job.pending and job.reason in reasons.PERMANENT and job.retry_at is not None
                    and now - self._failed_at.get(job.key, 0.0) >= RECHECK_MIN_S):  # fmt: skip
                self._recheck.add(job.key)
                job.retry_at = None

    # ---- abandoned uploads (``ckptd abandon``) -------------------------------------------------

    async def watch_abandoned(self) -> None:
        """End the jobs whose upload was abandoned on disk (``abandon``), within a second."""
        root = self.cfg.root
        while True:
            owed = [j for j in self.jobs.values() if j.pending and j.part is None and j.store
                    and j.committed_at and j.key not in self._abandoning]  # fmt: skip
            if owed:
                marked = await asyncio.to_thread(_marked, root, owed)
                for job in marked:
                    await self._abandon(job)
            await asyncio.sleep(ABANDON_POLL)

    async def _abandon(self, job: Job) -> None:
        self._abandoning.add(job.key)
        if job in self.queue:
            self.queue.remove(job)
        task = self._inflight.get(job.key)
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        if not job.pending:  # it reached its store just before: nothing to give up
            self._abandoning.discard(job.key)
            return
        await asyncio.to_thread(clear_record, self.cfg.root, job.run, job.tag)  # the journal
        error = (f"upload to {job.store} abandoned on purpose (ckptd abandon); the local copy "
                 f"stays in {self.cfg.root}")  # fmt: skip
        log.warning("%s: %s", job.key, error)
        job.reason, job.error, job.retry_at = "abandoned", error, None
        self._log_throttle.forget(job.key)
        self.jobs.send(job, Failed(id=job.save_id or 0, error=error))
        await self.jobs.drop(job, error)
        self._abandoning.discard(job.key)

    # ---- retention -----------------------------------------------------------------------------

    def retain(self, job: Job) -> None:
        """Apply retention to the run in the background after one of its checkpoints reached
        its store; a failed delete is logged, never fatal."""
        self._spawn(self._retain(job))

    def _blob_lock(self, key: str) -> asyncio.Lock:
        lock = self._blob_locks.get(key)
        if lock is None:
            lock = self._blob_locks[key] = asyncio.Lock()
        return lock

    def _skipped(self, job: Job, n: int) -> None:
        """A blob the store holds already: not uploaded, and not counted as uploaded."""
        job.bytes_deduped += n

    def in_flight_blobs(self, run: str) -> set[str]:
        """The shared blobs that pending checkpoints of ``run`` use (before their manifests
        are listed anywhere): retention never deletes them."""
        return {b for j in self.jobs.values() if j.run == run and j.pending for b in j.blobs}

    async def _retain(self, job: Job) -> None:
        lock = self._retaining.setdefault(job.run, asyncio.Lock())
        async with lock:  # one pass per run at a time: passes that overlap only repeat work
            await self._retain_now(job)

    async def _retain_now(self, job: Job) -> None:
        pending = {j.tag for j in self.jobs.values() if j.run == job.run and j.pending}
        root = self.stores.get(self.cfg.root)

        def in_flight() -> set[str]:
            return self.in_flight_blobs(job.run)

        try:
            if self.stores.is_root(job.store):
                if self.cfg.retention.active:
                    await retention.apply(root, job.run, self.cfg.retention, protect=pending,
                                          protect_blobs=in_flight)  # fmt: skip
                return
            assert job.store is not None
            if self.cfg.retention.active:
                await retention.apply(self.stores.get(job.store), job.run, self.cfg.retention,
                                      protect_blobs=in_flight,
                                      blob_grace=self.cfg.blob_grace)  # fmt: skip
            if self.cfg.local_retention.active:
                owed = {tag for run, tag, _ in pending_records(self.cfg.root) if run == job.run}
                owed |= abandoned_tags(self.cfg.root, job.run)  # abandoned: the copy stays
                await retention.apply(root, job.run, self.cfg.local_retention,
                                      protect=pending | owed,
                                      protect_blobs=in_flight)  # fmt: skip
        except (CkptdError, OSError) as e:
            log.warning("retention for %s failed (nothing lost): %s", job.run, e)


def _manifest_bytes(root: str, job: Job) -> int:
    """The size of a committed checkpoint, from its manifest (0 if it cannot be read: the
    upload itself then says why)."""
    try:
        with open(os.path.join(checkpoint_dir(root, job.run, job.tag), "MANIFEST.json"), "rb") as f:
            files = json.load(f)["files"]
        return sum(int(rec["size"]) for rec in files.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0


def _marked(root: str, jobs: list[Job]) -> list[Job]:
    return [j for j in jobs if is_abandoned(root, j.run, j.tag)]
