"""The job table: what the daemon knows about each checkpoint it handles, and the one place
where a job ends (uploaded, failed, dropped) and its client hears of it.

It also keeps what an operator asks about (``ckptd status``, the metrics endpoint): each job's
named phase, its rate over the last few seconds (``meter`` samples the byte counters once a
second, so the write and upload hot paths only add to an int) and ETA, and totals since start
that outlive the jobs the table forgets (``Stats``). ``docs/status.md`` lists the fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..protocol import Event, Failed, Released, Uploaded
from .metrics import Histogram
from .reasons import PERMANENT


class JobState(enum.StrEnum):
    STAGED = "staged"  # received, waiting for a writer
    WRITING = "writing"
    COMMITTED = "committed"  # complete on local disk; upload pending or running
    UPLOADING = "uploading"
    UPLOADED = "uploaded"  # in the store (or the root is the store): final
    FAILED = "failed"  # final
    DROPPED = "dropped"  # upload superseded by a newer checkpoint (preemption): final
    LOCAL_ONLY = "local-only"  # not a K-th one under --upload-every K; uploaded only if it is
    # the newest of its run at a drain or a preemption notice (then COMMITTED again)


FINAL = {JobState.UPLOADED, JobState.FAILED, JobState.DROPPED, JobState.LOCAL_ONLY}
_NO_SLOT: Any = object()

RATE_WINDOW = 10.0
"""Seconds of byte progress a job's current rate is measured over: long enough to smooth the
bursts of multipart uploads, short enough that a stall shows within seconds."""
SHOW_FINISHED = 5
"""Finished jobs that ``status`` lists one by one; older ones are summed up in ``summary``."""


class Phase(enum.StrEnum):
    """What an operator sees a checkpoint doing (``status``'s ``phase``), finer than the state."""

    QUEUED = "queued"  # waiting for a writer, or committed and waiting for an upload worker
    WRITING = "writing"
    COMMITTED = "committed"  # complete on local disk, its upload waiting out a retry backoff
    UPLOADING = "uploading"
    FINISHING = "finishing"  # every byte sent: completing multipart, manifest, ``latest``
    UPLOADED = "uploaded"
    FAILED = "failed"
    DROPPED = "dropped"
    LOCAL_ONLY = "local-only"


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
    reason: str | None = None  # why it is not in its store yet (``reasons.Reason``), or None
    reason_since: float | None = None  # when that reason was first seen (in a row)
    attempts: int = 0  # failed upload attempts since ``reason_since``
    created: float = field(default_factory=time.time)
    committed_at: float | None = None
    uploaded_at: float | None = None
    upload_started: float | None = None
    write_started: float | None = None
    retry_at: float | None = None  # when a failed upload attempt is tried again
    samples: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=12))
    """(monotonic time, 1 writing / 2 uploading, bytes so far) once a second (``meter``)."""
    part: str | None = None
    """For one rank's part of a sharded (DCP) checkpoint: its file name. Parts have no manifest
    of their own; a ``commit`` request lists them once every rank's part is in place."""
    files: dict[str, Any] = field(default_factory=dict)  # name -> {size, crc32c}, once written
    blobs: set[str] = field(default_factory=set)
    """The run's shared blobs this checkpoint uses (``ckptd.blobs``): while it is pending,
    retention never deletes them, even before its manifest exists."""
    bytes_new: int | None = None
    """Bytes this save wrote that were not stored already; None: not known (a part, an owed
    upload found at start)."""
    bytes_deduped: int = 0

    @property
    def key(self) -> str:
        return f"{self.run}@{self.tag}" + (f"#{self.part}" if self.part else "")

    @property
    def pending(self) -> bool:
        return self.state not in FINAL

    @property
    def phase(self) -> Phase:
        if self.state == JobState.STAGED:
            return Phase.QUEUED
        if self.state == JobState.COMMITTED:
            waiting = self.retry_at is not None and self.retry_at > time.time()
            return Phase.COMMITTED if waiting else Phase.QUEUED
        if self.state == JobState.UPLOADING:
            done = self.bytes_total > 0 and self.bytes_uploaded >= self.bytes_total
            return Phase.FINISHING if done else Phase.UPLOADING
        return Phase(str(self.state))

    def rate(self, now: float | None = None) -> float:
        """Bytes per second of the running stage over the last ``RATE_WINDOW`` seconds."""
        if self.state == JobState.WRITING:
            code, current = 1, self.bytes_written
        elif self.state == JobState.UPLOADING:
            code, current = 2, self.bytes_uploaded
        else:
            return 0.0
        now = time.monotonic() if now is None else now
        first = next((s for s in self.samples if s[0] >= now - RATE_WINDOW), None)
        if first is None or first[1] != code or now - first[0] < 0.5:
            return 0.0
        # A few bytes (a small file of the checkpoint) are no rate to extrapolate from.
        if current - first[2] < min(1 << 20, max(1, self.bytes_total // 100)):
            return 0.0
        return (current - first[2]) / (now - first[0])

    def idle(self, now: float | None = None) -> float | None:
        """Seconds since the running stage's byte count last moved (None: not running, or
        not sampled yet). Store uploads count bytes when a part is confirmed, so a few
        seconds without progress are normal while large parts are in flight."""
        if self.state not in (JobState.WRITING, JobState.UPLOADING) or not self.samples:
            return None
        now = time.monotonic() if now is None else now
        current = self.bytes_written if self.state == JobState.WRITING else self.bytes_uploaded
        since = None
        for t, _, value in reversed(self.samples):
            if value != current:
                break
            since = t
        return 0.0 if since is None else max(0.0, now - since)

    def as_dict(self) -> dict[str, Any]:
        phase = self.phase
        rate = self.rate()
        writing = self.state in (JobState.STAGED, JobState.WRITING) or self.committed_at is None
        done = self.bytes_written if writing else self.bytes_uploaded
        if phase == Phase.UPLOADED:
            done = self.bytes_total
        left = max(0, self.bytes_total - done)
        upload_rate = rate if phase == Phase.UPLOADING else 0.0
        if self.upload_started and self.uploaded_at and self.bytes_uploaded:
            upload_rate = self.bytes_uploaded / max(self.uploaded_at - self.upload_started, 1e-6)
        return {
            "run": self.run,
            "tag": self.tag,
            "part": self.part,
            "step": self.step,
            "state": str(self.state),
            "phase": str(phase),
            "store": self.store,
            "bytes_total": self.bytes_total,
            "bytes_new": self.bytes_new,
            "bytes_written": self.bytes_written,
            "bytes_uploaded": self.bytes_uploaded,
            "bytes_done": min(done, self.bytes_total) if self.bytes_total else done,
            "rate": rate,
            "eta": left / rate if rate > 0 else None,
            "idle": self.idle(),
            "upload_rate": upload_rate,
            "retries": self.retries,
            "retry_at": self.retry_at if phase == Phase.COMMITTED else None,
            "error": self.error,
            "reason": self.reason,
            "reason_since": self.reason_since,
            "attempts": self.attempts,
            "created": self.created,
            "committed_at": self.committed_at,
            "upload_started": self.upload_started,
            "uploaded_at": self.uploaded_at,
            "phase_since": self._phase_since(phase),
        }

    def _phase_since(self, phase: Phase) -> float:
        """When the current phase began, as well as the job's timestamps say."""
        if phase in (Phase.UPLOADING, Phase.FINISHING) and self.upload_started:
            return self.upload_started
        if phase == Phase.WRITING and self.write_started:
            return self.write_started
        if phase in (Phase.COMMITTED, Phase.QUEUED) and self.committed_at:
            return self.committed_at
        if phase == Phase.UPLOADED and self.uploaded_at:
            return self.uploaded_at
        return self.created


STAGES = ("write", "commit", "upload")
MAX_RUNS = 1000  # per-run gauges kept; run names are user input, so their number is bounded


@dataclass(slots=True)
class Stats:
    """Totals since start, for ``status`` and the metrics endpoint; they outlive the jobs the
    table forgets, so the counters only ever grow."""

    bytes_written: int = 0
    bytes_uploaded: int = 0
    bytes_deduped: int = 0
    """Bytes of saves that were stored already (linked, not written; not uploaded again)."""
    saves: int = 0
    """Checkpoints accepted: whole saves and sharded commits (not their parts, nor the ones a
    restarted daemon found owed)."""
    failures: int = 0
    """Jobs that ended failed (refused saves included)."""
    retired_retries: dict[str, int] = field(default_factory=dict)
    """Store URL -> upload retries of the jobs the table forgot (``upload_retries``)."""
    durations: dict[str, Histogram] = field(
        default_factory=lambda: {stage: Histogram() for stage in STAGES}
    )
    """Seconds per stage, observed when a job ends: ``write`` (its files written, synced and
    committed), ``commit`` (received to committed locally, waiting for a writer included),
    ``upload`` (first attempt to in the store, retries included)."""
    last_upload: dict[str, float] = field(default_factory=dict)
    """Run -> when its last checkpoint reached its store (wall time)."""
    newest_durable: dict[str, tuple[int, float]] = field(default_factory=dict)
    """Run -> (step, created) of the newest checkpoint in its store."""
    retired: dict[str, int] = field(default_factory=dict)
    """Phase -> finished jobs the table forgot (for ``summary``)."""
    retired_bytes: int = 0
    retired_since: float | None = None

    def ended(self, job: Job) -> None:
        """Count a job that reached its final state."""
        if job.committed_at is not None:
            self.durations["commit"].observe(job.committed_at - job.created)
            if job.write_started is not None:
                self.durations["write"].observe(job.committed_at - job.write_started)
        if job.state == JobState.FAILED:
            self.failures += 1
        if job.state != JobState.UPLOADED or job.uploaded_at is None:
            return
        if job.upload_started is not None:
            self.durations["upload"].observe(job.uploaded_at - job.upload_started)
        if job.part is None:
            _bounded_set(self.last_upload, job.run, job.uploaded_at)
            newest = self.newest_durable.get(job.run)
            if newest is None or job.step >= newest[0]:
                _bounded_set(self.newest_durable, job.run, (job.step, job.created))

    def retire(self, job: Job) -> None:
        """Sum up a finished job the table forgets."""
        if job.retries:
            store = job.store or ""
            self.retired_retries[store] = self.retired_retries.get(store, 0) + job.retries
        phase = str(job.phase)
        self.retired[phase] = self.retired.get(phase, 0) + 1
        self.retired_bytes += job.bytes_total
        if self.retired_since is None or job.created < self.retired_since:
            self.retired_since = job.created


def _bounded_set(d: dict[str, Any], key: str, value: Any) -> None:
    d.pop(key, None)  # re-inserted last: the dict's order is the order of updates
    d[key] = value
    while len(d) > MAX_RUNS:
        del d[next(iter(d))]


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
        self.stats = Stats()

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
        if job.state == JobState.STAGED and job.part is None:
            self.stats.saves += 1
        if (old := self.jobs.get(job.key)) is not None and old is not job:
            self.stats.retire(old)  # a failed tag saved again: the new job replaces it
        self.jobs[job.key] = job
        if len(self.jobs) > self._keep * 2:
            done = [k for k, j in self.jobs.items() if j.state in FINAL]
            for k in done[: len(done) - self._keep]:
                self.stats.retire(self.jobs.pop(k))

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
        self.stats.ended(job)
        self.send(job, Uploaded(id=job.save_id or 0))
        await self.changed()

    async def fail(self, job: Job, error: str, *, release_slot: Any = _NO_SLOT) -> None:
        """End a job as failed; ``release_slot`` also tells the client its slot is free."""
        job.state = JobState.FAILED
        job.error = error
        self.stats.ended(job)
        if release_slot is not _NO_SLOT:
            self.send(job, Released(id=job.save_id or 0, slot=release_slot))
        self.send(job, Failed(id=job.save_id or 0, error=error))
        await self.changed()

    async def drop(self, job: Job, reason: str) -> None:
        job.state = JobState.DROPPED
        job.error = reason
        self.stats.ended(job)
        await self.changed()

    def unfinished(self) -> list[Job]:
        """Jobs still pending, and upload failures: checkpoints that are not in their store."""
        return [
            j
            for j in self.jobs.values()
            if j.pending or (j.state == JobState.FAILED and j.committed_at is not None)
        ]

    async def settle(self, deadline: float | None) -> None:
        """Wait until no job is pending, or until ``deadline`` (monotonic). A job whose store
        said no (``reasons.PERMANENT``: a missing bucket, denied access) and that waits for its
        slow re-check does not hold it up; the drain reports it with its reason."""
        async with self._change:
            while any(j.pending and not _refused(j) for j in self.jobs.values()):
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

    def upload_retries(self) -> dict[str, int]:
        """Store URL -> upload attempts that failed and were queued again, since start."""
        out = dict(self.stats.retired_retries)
        for j in self.jobs.values():
            if j.retries:
                out[j.store or ""] = out.get(j.store or "", 0) + j.retries
        return out

    def view(self, finished: int = SHOW_FINISHED) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """What ``status`` lists: every pending job and the last ``finished`` finished ones
        (oldest first), and a summary of every older finished job since start, so the reply
        stays small however long the daemon runs."""
        by_age = sorted(self.jobs.values(), key=lambda j: j.created)
        done = [j for j in by_age if not j.pending]
        shown = set(map(id, done[max(0, len(done) - finished) :] if finished > 0 else []))
        listed = [j.as_dict() for j in by_age if j.pending or id(j) in shown]
        counts = dict(self.stats.retired)
        total = self.stats.retired_bytes
        since = self.stats.retired_since
        for j in done:
            if id(j) in shown:
                continue
            counts[str(j.phase)] = counts.get(str(j.phase), 0) + 1
            total += j.bytes_total
            since = j.created if since is None else min(since, j.created)
        summary = {"jobs": sum(counts.values()), "counts": counts, "bytes": total, "since": since}
        return listed, summary

    async def meter(self, interval: float = 1.0) -> None:
        """Sample the byte counters of running jobs once per ``interval`` (for ``Job.rate``);
        a new stage or a restarted attempt starts the samples over."""
        while True:
            now = time.monotonic()
            for j in self.jobs.values():
                if j.state == JobState.WRITING:
                    code, value = 1, j.bytes_written
                elif j.state == JobState.UPLOADING:
                    code, value = 2, j.bytes_uploaded
                else:
                    continue
                last = j.samples[-1] if j.samples else None
                if last is not None and (last[1] != code or value < last[2]):
                    j.samples.clear()
                j.samples.append((now, code, value))
            await asyncio.sleep(interval)


def _refused(job: Job) -> bool:
    """Its store said no and it waits for a slow re-check (not queued, not being tried)."""
    return job.reason in PERMANENT and job.retry_at is not None
