"""The write stage: a validated save message -> files on local disk -> committed.

One path for whole saves and for one rank's part of a sharded save; they differ only in where
the files go (``<tag>.partial`` and then a manifest, or the daemon's hidden parts directory) and
in what "committed" means for them. Writes run in threads (``commit``), at most ``writers``
checkpoints at a time. A whole save that will be uploaded asks its store, while it is being
written, whether the tag exists there already: the tag check covers the store, not only this
root, so a rerun on a fresh machine never overwrites a committed checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ..errors import (
    AlreadyExistsError,
    CkptdError,
    ConfigError,
    NotFoundError,
    ProtocolError,
    StorageError,
)
from ..header import FORMAT, decode_header
from ..names import check_file_name, check_name
from ..protocol import Committed, FrameReader, Released, SaveRequest, SlotRequest
from ..storage import join_key
from . import recovery
from .blobstore import Dedup, LocalBlobs
from .commit import StagedFile, commit, update_latest, write_part, write_staged
from .config import DaemonConfig
from .connections import Client
from .jobs import Job, JobState, JobTable, Stats
from .lease import BytesSource, SlotLease
from .stores import StoreSet
from .upload import write_record

log = logging.getLogger("ckptd.daemon")

MAX_SLOTS = 64
MAX_SLOT_SIZE = 1 << 42
STORE_CHECK_TIMEOUT = 5.0
DATA_SUFFIXES = (".safetensors", ".msgpack")

_MANIFEST_FIELDS = (
    "training_iteration", "metrics", "model_config", "git_commit", "rank", "world_size", "kind",
    "dcp", "meta", "torch_version", "host", "pid",
)  # fmt: skip
"""What a client may put into its manifest; the daemon writes the rest."""


def check_data_name(name: object, suffixes: tuple[str, ...] = DATA_SUFFIXES) -> str:
    """A file a client names in a message: the name rule, and one of ``suffixes``; a bad one is
    a protocol error (the client is at fault, not a user's argument)."""
    try:
        check_file_name(name)
    except ConfigError as e:
        raise ProtocolError(str(e)) from None
    assert isinstance(name, str)
    if not name.endswith(suffixes):
        raise ProtocolError(f"file {name!r} must end in {' or '.join(suffixes)}")
    return name


@dataclass(slots=True)
class StagedSave:
    """A save message, validated: what the write stage needs, and the lease on its slot."""

    job: Job
    files: list[StagedFile]
    inline: dict[str, bytes]
    lease: SlotLease | None
    slot: Any
    manifest_in: dict[str, Any]

    def close(self) -> None:
        if self.lease is not None:
            self.lease.close()


def accept_slot(client: Client, req: SlotRequest, reader: FrameReader) -> None:
    """A ``slot`` message: the client's staging memory, kept by descriptor until replaced."""
    if not reader.fds:
        raise ProtocolError("slot message without a file descriptor")
    fd = reader.fds.popleft()
    try:
        if not 0 <= req.slot < MAX_SLOTS or not 0 < req.size <= MAX_SLOT_SIZE:
            raise ProtocolError(f"slot {req.slot} of {req.size} bytes is out of range")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < req.size:
            raise ProtocolError(f"slot {req.slot}: descriptor is not a {req.size} byte memory file")
    except (ProtocolError, OSError):
        os.close(fd)
        raise
    client.set_slot(req.slot, fd, req.size, req.generation)


def parse_save(client: Client, req: SaveRequest, default_store: str | None) -> StagedSave:
    """Check a ``save`` against the client's slots; raise ``ProtocolError`` (the client is
    dropped) or ``ConfigError`` (a bad name: the save is refused, the client kept)."""
    run = check_name(req.run, "run")
    tag = check_name(req.tag, "tag")
    store = req.store or client.store or default_store
    files, inline, lease, total = _files(client, req)
    job = Job(run=run, tag=tag, step=req.step, store=store, client=client.id, save_id=req.id)
    job.bytes_total = total
    staged = StagedSave(job, files, inline, lease, req.slot, req.manifest or {})
    if req.part:
        if len(files) != 1 or inline or lease is None:
            staged.close()
            raise ProtocolError("a part save carries exactly one staged file")
        job.part = files[0].name
    return staged


def _files(
    client: Client, req: SaveRequest
) -> tuple[list[StagedFile], dict[str, bytes], SlotLease | None, int]:
    names: set[str] = set()
    files: list[StagedFile] = []
    lease: SlotLease | None = None
    slot_size = 0
    if req.files:
        if req.slot is None or req.slot not in client.slots:
            raise ProtocolError(f"save names slot {req.slot}, which this client never sent")
        fd, slot_size, gen = client.slots[req.slot]
        if req.generation != gen:
            raise ProtocolError(
                f"save names generation {req.generation} of slot {req.slot}, not {gen}"
            )
        # The job keeps the memory alive even if the client dies or replaces the slot now.
        lease = SlotLease(fd, slot_size, label=f"slot {req.slot} of client {client.id}")
    total = 0
    try:
        for f in req.files:
            name = check_data_name(f.name)
            if name in names:
                raise ProtocolError(f"repeated file name {name!r}")
            segments = None
            pieces = [(f.offset, f.size)]
            if f.segments is not None:
                segments = pieces = _segments(name, f.segments, f.size)
            for o, n in pieces:
                if o < 0 or n < 0 or o + n > slot_size:
                    raise ProtocolError(
                        f"{name}: bytes [{o}, {o + n}) lie outside the {slot_size} byte slot"
                    )
            try:
                decode_header(f.header, len(f.header) + f.size)
            except CkptdError as e:
                raise ProtocolError(f"{name}: {e}") from e
            names.add(name)
            files.append(StagedFile(name, f.header, f.offset, f.size, segments, f.dedup, f.blob))
            total += len(f.header) + f.size
        inline: dict[str, bytes] = {}
        for name, data in (req.inline or {}).items():
            check_data_name(name)
            if name in names:
                raise ProtocolError(f"repeated file name {name!r}")
            names.add(name)
            inline[name] = data
            total += len(data)
        if not names:
            raise ProtocolError("save with no files")
    except ProtocolError:
        if lease is not None:
            lease.close()
        raise
    return files, inline, lease, total


def _segments(name: str, raw: list[list[int]], size: int) -> list[tuple[int, int]]:
    out = []
    for seg in raw:
        if len(seg) != 2:
            raise ProtocolError(f"{name}: segments must be [offset, size] pairs")
        out.append((int(seg[0]), int(seg[1])))
    if sum(n for _, n in out) != size:
        raise ProtocolError(f"{name}: segments do not add up to {size} bytes")
    return out


class WriteStage:
    """Writes staged saves, at most ``writers`` at a time, and commits whole ones locally."""

    def __init__(
        self,
        cfg: DaemonConfig,
        jobs: JobTable,
        stores: StoreSet,
        stats: Stats,
        *,
        committed: Callable[[Job], Any],
        orphaned: Callable[[Job], Any],
    ) -> None:
        self.cfg = cfg
        self.jobs = jobs
        self.stores = stores
        self.stats = stats
        self._committed = committed  # async: hand a committed job on (upload, or finish)
        self._orphaned = orphaned  # async: True if a part's rank went away (the part is dropped)
        self._sem = asyncio.Semaphore(cfg.writers)
        self.blobs = LocalBlobs(cfg.root)
        self._latest: dict[str, int] = {}
        self._latest_lock = asyncio.Lock()

    async def write(self, save: StagedSave) -> None:
        """Write one save, whole or part, and hand it on; every failure ends the job."""
        job = save.job
        released = False
        partial: str | None = None
        records: dict[str, Any] | None = None
        final = ""
        uploading = not self.stores.is_root(job.store)
        taken = None
        if uploading and job.part is None:
            # Asked while the files are written, so the check costs the save no time.
            taken = asyncio.ensure_future(self._taken_in_store(job))
        try:
            with save.lease or contextlib.nullcontext():  # closed on every path, cancel included
                async with self._sem:
                    job.state = JobState.WRITING
                    job.write_started = time.time()

                    def progress(n: int) -> None:
                        job.bytes_written += n
                        self.stats.bytes_written += n

                    source = save.lease or BytesSource(b"")
                    if job.part is not None:
                        final, record = await asyncio.to_thread(
                            write_part, self.cfg.root, job.run, job.tag, save.files[0], source,
                            progress,
                        )  # fmt: skip
                        job.files = {job.part: record}
                    else:
                        dedup = Dedup(self.blobs, job.run, job.blobs)
                        partial, records = await asyncio.to_thread(
                            write_staged, self.cfg.root, job.run, job.tag, save.files,
                            save.inline, source, progress, dedup,
                        )  # fmt: skip
                        job.bytes_new = dedup.new_bytes
                        job.bytes_deduped = dedup.deduped
                        self.stats.bytes_deduped += dedup.deduped
            released = True
            self.jobs.send(job, Released(id=job.save_id or 0, slot=save.slot))
            if job.part is None:
                assert partial is not None
                if taken is not None and (holder := await taken) is not None:
                    raise AlreadyExistsError(
                        f"checkpoint {job.key} already exists in {holder}; tags are never "
                        "overwritten (resume with restore() to continue that run, or use a new "
                        "run name)"
                    )
                manifest = self.manifest(job, save.manifest_in, records)
                if uploading:
                    assert job.store is not None
                    await asyncio.to_thread(
                        write_record, self.cfg.root, job.run, job.tag, job.store
                    )
                final = await asyncio.to_thread(commit, partial, manifest)
                partial = None
                await self.advance_latest(job)
        except (OSError, CkptdError) as e:
            msg = f"could not commit {job.key}: {e}"
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                msg = f"could not commit {job.key}: the disk under {self.cfg.root} is full"
            log.error(msg)
            await self._failed(job, msg, partial, taken, released, save.slot)
            return
        except Exception as e:  # a bug in one save must not hang its client
            log.exception("internal error while committing %s", job.key)
            msg = f"internal error while committing {job.key}: {e!r}"
            await self._failed(job, msg, partial, taken, released, save.slot)
            return
        if job.part is not None and await self._orphaned(job):
            return
        job.state = JobState.COMMITTED
        job.committed_at = time.time()
        took = job.committed_at - job.created
        log.info(
            "committed %s: %.1f MiB in %.2f s (%.0f MiB/s) -> %s",
            job.key, job.bytes_total / 2**20, took, job.bytes_total / 2**20 / max(took, 1e-6), final,
        )  # fmt: skip
        files = job.files if job.part is not None else None
        blobs = {n: r["blob"] for n, r in (records or {}).items() if "blob" in r} or None
        self.jobs.send(
            job, Committed(id=job.save_id, tag=job.tag, path=final, files=files, blobs=blobs)
        )
        await self._committed(job)

    async def _failed(
        self,
        job: Job,
        msg: str,
        partial: str | None,
        taken: asyncio.Future[str | None] | None,
        released: bool,
        slot: Any,
    ) -> None:
        if taken is not None:
            taken.cancel()
        if partial:
            shutil.rmtree(partial, ignore_errors=True)
        if released:
            await self.jobs.fail(job, msg)
        else:
            await self.jobs.fail(job, msg, release_slot=slot)

    async def _taken_in_store(self, job: Job) -> str | None:
        """The store URL if it already holds a manifest for this tag, else None.

        A store that cannot be asked within a few seconds does not hold up the commit: the
        upload stage asks again before it writes anything, and writes the manifest create-only.
        """
        assert job.store is not None
        key = join_key(job.run, "checkpoints", job.tag, "MANIFEST.json")
        store = self.stores.get(job.store)
        try:
            await asyncio.wait_for(store.get_bytes(key), timeout=STORE_CHECK_TIMEOUT)
        except NotFoundError:
            return None
        except (TimeoutError, StorageError, OSError) as e:
            log.info("could not ask %s whether %s exists (%s); the upload checks again",
                     job.store, job.key, e)  # fmt: skip
            return None
        return store.url

    def manifest(self, job: Job, given: dict[str, Any], files: dict[str, Any]) -> dict[str, Any]:
        """The commit marker: the client's fields it may set, then the daemon's own."""
        manifest = {k: given[k] for k in _MANIFEST_FIELDS if k in given}
        metrics = manifest.get("metrics")
        if metrics is not None and not (
            isinstance(metrics, dict)
            and all(
                isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
                for k, v in metrics.items()
            )
        ):
            raise ProtocolError("metrics must map names to numbers")
        manifest.update(
            format=FORMAT,
            run_id=job.run,
            tag=job.tag,
            step=job.step,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            ckptd_version=__version__,
            files=files,
        )
        # Unique per save: two writers of one run@tag never have equal manifests, so a store
        # without create-only writes still tells (by reading it back) whose commit won.
        manifest["attempt"] = uuid.uuid4().hex
        if options := self.stores.manifest_options(job.store):
            manifest["store_options"] = options
        return manifest

    async def advance_latest(self, job: Job) -> None:
        """Point the root's ``<run>/latest`` at this checkpoint if it is the newest step."""
        async with self._latest_lock:  # concurrent writers must not race on one pointer
            newest = self._latest.get(job.run)
            if newest is None:
                newest = await asyncio.to_thread(recovery.latest_step, self.cfg.root, job.run)
            if job.step >= newest:
                await asyncio.to_thread(update_latest, self.cfg.root, job.run, job.tag)
                self._latest[job.run] = job.step
            else:
                self._latest[job.run] = newest
