"""The upload stage: one queue for every committed checkpoint, every rank's part and every
experiment record the mirror uploads.

Order: the run served least recently first (fair share between runs); under a preemption
notice, the newest checkpoint first (records after every checkpoint), and waiting uploads that
a newer committed checkpoint of the run supersedes are dropped (their local copies stay). At most
``uploads`` items are in flight, whatever their kind.

Retries, one layer per operation: each store request is retried by the store itself (typed
transient errors, backoff with jitter, counted in ``status`` per store); a checkpoint whose
upload still failed goes back to this queue after a backoff (``job.retries``, the last error in
``job.error``), resuming from its journal. Errors that retrying cannot fix (access denied, the
tag is another writer's, a committed file no longer matches its manifest) end the job at once.
After an upload, retention runs for the run (``retain``), in the store and then in the root.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .. import retention
from ..errors import (
    AlreadyExistsError,
    CkptdError,
    IntegrityError,
    PermanentStorageError,
    StorageError,
)
from .config import DaemonConfig
from .jobs import Job, JobState, JobTable, Stats
from .stores import StoreSet
from .upload import clear_record, pending_records, upload_checkpoint

log = logging.getLogger("ckptd.daemon")

MAX_BACKOFF = 60.0


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
        self.preempted = False

    # ---- the queue -----------------------------------------------------------------------------

    def enqueue(self, job: Job | Record) -> None:
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
        job.upload_started = job.upload_started or time.time()
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
                await upload_checkpoint(
                    self.stores.get(job.store),
                    self.cfg.root,
                    job.run,
                    job.tag,
                    file_concurrency=self.cfg.file_concurrency,
                    progress=progress,
                    with_retries=_once,
                )
                await self.stores.advance_latest(job.store, job.run, job.tag, job.step)
                await asyncio.to_thread(clear_record, self.cfg.root, job.run, job.tag)
        except (PermanentStorageError, AlreadyExistsError, IntegrityError) as e:
            # Retrying cannot help: the store refuses us, the tag is another writer's, or a
            # committed file no longer matches its manifest. Say so once; keep the local copy.
            error = f"upload of {job.key} to {job.store} failed: {e}"
            log.error("%s (the local copy stays in %s)", error, self.cfg.root)
            await self.jobs.fail(job, error)
            return
        except (StorageError, CkptdError, OSError) as e:
            job.error = f"upload of {job.key} to {job.store} interrupted: {e}"
            job.state = JobState.COMMITTED
            job.retries += 1
            delay = min(MAX_BACKOFF, 2.0 ** min(job.retries, 6))
            log.warning("%s; retry %d in %.0f s", job.error, job.retries, delay)
            self._spawn(self._requeue_later(job, delay))
            return
        job.error = None
        took = time.time() - (job.upload_started or time.time())
        sent = max(job.bytes_uploaded, job.bytes_total) / 2**20
        log.info(
            "uploaded %s to %s: %.1f MiB in %.1f s (%.1f MiB/s), %d retries",
            job.key, job.store, sent, took, sent / max(took, 1e-6), job.retries,
        )  # fmt: skip
        await self.jobs.finish(job)
        if job.part is None:
            self.retain(job)

    async def _requeue_later(self, job: Job, delay: float) -> None:
        deadline = time.monotonic() + delay
        # A drain that starts meanwhile shortens the wait: the network may be back already.
        while time.monotonic() < deadline and not (self.jobs.closing and delay > 2):
            await asyncio.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
        if job.pending:
            self.enqueue(job)

    # ---- retention -----------------------------------------------------------------------------

    def retain(self, job: Job) -> None:
        """Apply retention to the run in the background after one of its checkpoints reached
        its store; a failed delete is logged, never fatal."""
        self._spawn(self._retain(job))

    async def _retain(self, job: Job) -> None:
        pending = {j.tag for j in self.jobs.values() if j.run == job.run and j.pending}
        root = self.stores.get(self.cfg.root)
        try:
            if self.stores.is_root(job.store):
                if self.cfg.retention.active:
                    await retention.apply(root, job.run, self.cfg.retention, protect=pending)
                return
            assert job.store is not None
            if self.cfg.retention.active:
                await retention.apply(self.stores.get(job.store), job.run, self.cfg.retention)
            if self.cfg.local_retention.active:
                owed = {tag for run, tag, _ in pending_records(self.cfg.root) if run == job.run}
                await retention.apply(root, job.run, self.cfg.local_retention,
                                      protect=pending | owed)  # fmt: skip
        except (CkptdError, OSError) as e:
            log.warning("retention for %s failed (nothing lost): %s", job.run, e)
