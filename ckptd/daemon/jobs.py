"""What the daemon knows about each checkpoint it is handling, for events, status and drain."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class JobState(enum.StrEnum):
    STAGED = "staged"  # received, waiting for a writer
    WRITING = "writing"
    COMMITTED = "committed"  # complete on local disk; upload pending or running
    UPLOADING = "uploading"
    UPLOADED = "uploaded"  # in the store (or the root is the store): final
    FAILED = "failed"  # final
    DROPPED = "dropped"  # upload superseded by a newer checkpoint (preemption): final


FINAL = {JobState.UPLOADED, JobState.FAILED, JobState.DROPPED}


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
