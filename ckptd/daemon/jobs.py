"""The job table: what the daemon knows about each checkpoint it handles, and the one place
where a job ends (uploaded, failed, dropped) and its client hears of it."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from dataclasses import dataclass, field
from typing import Any

from ..protocol import Event, Failed, Released, Uploaded


class JobState(enum.StrEnum):
    STAGED = "staged"  # received, waiting for a writer
    WRITING = "writing"
    COMMITTED = "committed"  # complete on local disk; upload pending or running
    UPLOADING = "uploading"
    UPLOADED = "uploaded"  # in the store (or the root is the store): final
    FAILED = "failed"  # final
    DROPPED = "dropped"  # upload superseded by a newer checkpoint (preemption): final


FINAL = {JobState.UPLOADED, JobState.FAILED, JobState.DROPPED}
_NO_SLOT: Any = object()


@dataclass(slots=True, eq=False)
class Job:
    run: str
    tag: str
    step: int
    store: str | None  # None: the root is the store
    state: JobState = JobState.STAGED
    client: int | None = None  # connection id to notify
    save_id: int | None = None
    bytes_total: int = 0
    bytes_written: int = 0
    bytes_uploaded: int = 0
    retries: int = 0
    error: str | None = None
    created: float = field(default_factory=time.time)
    committed_at: float | None = None
    uploaded_at: float | None = None
    upload_started: float | None = None
    part: str | None = None
    """For one rank's part of a sharded (DCP) checkpoint: its file name. Parts have no manifest
    of their own; a ``commit`` request lists them once every rank's part is in place."""
    files: dict[str, Any] = field(default_factory=dict)  # name -> {size, crc32c}, once written

    @property
    def key(self) -> str:
        return f"{self.run}@{self.tag}" + (f"#{self.part}" if self.part else "")

    @property
    def pending(self) -> bool:
        return self.state not in FINAL

    def as_dict(self) -> dict[str, Any]:
        now = time.time()
        rate = 0.0
        if self.upload_started and self.bytes_uploaded:
            end = self.uploaded_at or now
            rate = self.bytes_uploaded / max(end - self.upload_started, 1e-6)
        return {
            "run": self.run,
            "tag": self.tag,
            "part": self.part,
            "step": self.step,
            "state": str(self.state),
            "store": self.store,
            "bytes_total": self.bytes_total,
            "bytes_written": self.bytes_written,
            "bytes_uploaded": self.bytes_uploaded,
            "upload_rate": rate,
            "retries": self.retries,
            "error": self.error,
            "created": self.created,
            "committed_at": self.committed_at,
            "uploaded_at": self.uploaded_at,
        }


@dataclass(slots=True)
class Stats:
    """Totals since start, for ``status``."""

    bytes_written: int = 0
    bytes_uploaded: int = 0


class JobTable:
    """Every checkpoint the daemon handles, and the only place where one becomes final.

    Stages move a job through WRITING, COMMITTED and UPLOADING; ``finish``, ``fail`` and
    ``drop`` end it, tell its client, and wake whoever waits in ``settle`` (drain, shutdown).
    ``refusal`` is the one admission check for whole saves, parts and sharded commits alike.
    """

    def __init__(self, clients: dict[int, Any], keep_finished: int = 200) -> None:
        self.jobs: dict[str, Job] = {}
        self._clients = clients
        self._keep = keep_finished
        self._change = asyncio.Condition()
        self.closing = False

    def client(self, job: Job) -> Any:
        return self._clients.get(job.client or -1)

    def send(self, job: Job, msg: Event) -> None:
        """Tell the job's client, if it is still connected and the job is one of its saves."""
        if job.save_id is not None and (client := self.client(job)) is not None:
            client.send(msg)

    def refusal(self, job: Job) -> str | None:
        """Why a new job cannot start now, or None. A whole save or commit of a tag in
        progress blocks a part of it too, and vice versa."""
        if self.closing:
            return "the daemon is shutting down; save refused"
        for key in dict.fromkeys((f"{job.run}@{job.tag}", job.key)):
            if (old := self.jobs.get(key)) is not None and old.pending:
                return f"{key} is already being saved"
        return None

    def add(self, job: Job) -> None:
        self.jobs[job.key] = job
        if len(self.jobs) > self._keep * 2:
            done = [k for k, j in self.jobs.items() if j.state in FINAL]
            for k in done[: len(done) - self._keep]:
                del self.jobs[k]

    def get(self, key: str) -> Job | None:
        return self.jobs.get(key)

    def values(self) -> list[Job]:
        return list(self.jobs.values())

    async def changed(self) -> None:
        async with self._change:
            self._change.notify_all()

    async def finish(self, job: Job) -> None:
        job.state = JobState.UPLOADED
        job.uploaded_at = time.time()
        self.send(job, Uploaded(id=job.save_id or 0))
        await self.changed()

    async def fail(self, job: Job, error: str, *, release_slot: Any = _NO_SLOT) -> None:
        """End a job as failed; ``release_slot`` also tells the client its slot is free."""
        job.state = JobState.FAILED
        job.error = error
        if release_slot is not _NO_SLOT:
            self.send(job, Released(id=job.save_id or 0, slot=release_slot))
        self.send(job, Failed(id=job.save_id or 0, error=error))
        await self.changed()

    async def drop(self, job: Job, reason: str) -> None:
        job.state = JobState.DROPPED
        job.error = reason
        await self.changed()

    def unfinished(self) -> list[Job]:
        """Jobs still pending, and upload failures: checkpoints that are not in their store."""
        return [
            j
            for j in self.jobs.values()
            if j.pending or (j.state == JobState.FAILED and j.committed_at is not None)
        ]

    async def settle(self, deadline: float | None) -> None:
        """Wait until no job is pending, or until ``deadline`` (monotonic)."""
        async with self._change:
            while any(j.pending for j in self.jobs.values()):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._change.wait(), timeout=min(left or 1.0, 1.0))

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for j in self.jobs.values():
            counts[str(j.state)] = counts.get(str(j.state), 0) + 1
        return counts

    def recent(self, n: int) -> list[dict[str, Any]]:
        return [j.as_dict() for j in sorted(self.jobs.values(), key=lambda j: j.created)[-n:]]
