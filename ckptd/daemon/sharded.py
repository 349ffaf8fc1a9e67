"""Sharded (DCP) checkpoints in the daemon: the parts' uploads and the global commit.

Each rank of a ``torch.distributed.checkpoint`` save hands its node's daemon one file (a *part*).
The write stage writes it among the daemon's parts (``<root>/.ckptd/parts/``, hidden from
listings); when the store is elsewhere the upload stage puts it at its final place in the store
(``upload_part``). Nothing is visible until the coordinating rank sends ``commit`` with every
part: the daemon checks that each is in place with the size its rank reported, then writes the
metadata, ``MANIFEST.json`` last (create-only), and ``latest``. A part whose rank went away is
dropped: DCP cannot commit without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

import crc32c

from ..blobs import BLOB_DIR, blob_file, file_parts, is_digest
from ..errors import (
    AlreadyExistsError,
    CkptdError,
    ConfigError,
    NotFoundError,
    PermanentStorageError,
    ProtocolError,
)
from ..names import check_name
from ..protocol import CommitRequest, Committed, ErrorEvent
from ..storage import Store, join_key
from .commit import assemble_parts, commit, crc_hex, parts_dir
from .config import DaemonConfig
from .connections import Client
from .jobs import Job, JobState, JobTable
from .stores import StoreSet
from .upload import has_object, journal_dir
from .uploads import UploadStage
from .write import WriteStage, check_data_name

log = logging.getLogger("ckptd.daemon")

_CRC = re.compile(r"[0-9a-f]{8}")


class ShardedCommits:
    """Parts and global commits of sharded saves, on top of the write and upload stages."""

    def __init__(
        self,
        cfg: DaemonConfig,
        jobs: JobTable,
        stores: StoreSet,
        *,
        writes: Callable[[], WriteStage],
        uploads: Callable[[], UploadStage],
    ) -> None:
        self.cfg = cfg
        self.jobs = jobs
        self.stores = stores
        self._writes = writes
        self._uploads = uploads

    async def drop_if_orphan(self, job: Job) -> bool:
        """A part whose rank has gone can never be committed (DCP's gather fails without it):
        drop it rather than fill the disk and the store with bytes nobody will list."""
        client = self.jobs.client(job)
        if client is not None and client.alive:
            return False
        log.warning("dropping part %s: its rank disconnected", job.key)
        path = os.path.join(parts_dir(self.cfg.root, job.run, job.tag), job.part or "")
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, path)
        await self.jobs.drop(
            job, "its rank disconnected before the part was confirmed; the save cannot commit"
        )
        return True

    async def committed_part(self, job: Job) -> None:
        """A part is on local disk: upload it if the store is elsewhere, else it is done."""
        if self.stores.is_root(job.store):
            await self.jobs.finish(job)
        else:
            self._uploads().enqueue(job)

    async def upload_part(self, job: Job, progress: Callable[[int], None]) -> None:
        """A part goes to its final place in the store; the local copy is only staging."""
        assert job.store is not None and job.part is not None
        store = self.stores.get(job.store)
        prefix = join_key(job.run, "checkpoints", job.tag)
        try:
            await store.get_bytes(join_key(prefix, "MANIFEST.json"), start=0, end=1)
        except NotFoundError:
            pass
        else:
            raise AlreadyExistsError(
                f"checkpoint {job.run}@{job.tag} already exists in {job.store}; "
                "tags are never overwritten"
            )
        rec = job.files[job.part]
        path = os.path.join(parts_dir(self.cfg.root, job.run, job.tag), job.part)
        jdir = journal_dir(self.cfg.root, job.run, job.tag)
        await asyncio.to_thread(os.makedirs, jdir, exist_ok=True)
        key = join_key(job.run, *file_parts(job.tag, job.part, rec))
        if rec.get("blob") is not None:
            job.blobs.add(blob_file(job.part, rec["blob"]))
        # A shard that did not change since an earlier checkpoint is in the store already.
        if rec.get("blob") is None or not await has_object(store, key, int(rec["size"]), _plain):
            await store.put_file(
                key,
                path,
                size=int(rec["size"]),
                crc32c=int(rec["crc32c"], 16),
                journal=os.path.join(jdir, f"{job.part}.json"),
                progress=progress,
            )
        else:
            job.bytes_deduped += int(rec["size"])
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, path)
        # Empty once every part of this node is up; while a sibling part is still on its way,
        # its journal may not be written yet, and removing the directory under it would fail
        # that upload (and orphan its multipart upload). Check and rmdir with no await between.
        busy = any(
            j is not job and j.part is not None and j.run == job.run and j.tag == job.tag
            and j.pending
            for j in self.jobs.values()
        )  # fmt: skip
        if not busy:
            with contextlib.suppress(OSError):
                os.rmdir(jdir)

    async def reply_commit(self, client: Client, req: CommitRequest) -> None:
        """The global commit of a sharded checkpoint, asked by its coordinating rank once every
        rank's part is committed (local root) or uploaded (store): the metadata, then
        MANIFEST.json last, then ``latest``. Parts are checked to be in place first."""
        rid = req.rid

        def error(text: str) -> None:
            client.send(ErrorEvent(rid=rid, error=text))

        try:
            run = check_name(req.run, "run")
            tag = check_name(req.tag, "tag")
            step = req.step
            store_url = req.store or client.store or self.cfg.store
            parts = _part_records(req.parts)
            inline = req.inline or {}
            if not parts and not inline:  # an empty state dict still commits its metadata
                raise ProtocolError("a commit lists no parts and no files")
            for name in inline:
                if check_data_name(name, (".json",)) in parts:
                    raise ProtocolError(f"bad inline file {name!r}")
            given = req.manifest or {}
        except (ProtocolError, ConfigError) as e:
            error(str(e))
            return
        job = Job(run=run, tag=tag, step=step, store=store_url, client=client.id)
        job.bytes_total = sum(int(r["size"]) for r in parts.values())
        if (refusal := self.jobs.refusal(job)) is not None:
            error(refusal)
            return
        for name, rec in parts.items():  # what this daemon wrote itself must match the claim
            mine = self.jobs.get(f"{job.key}#{name}")
            if mine is not None and mine.files.get(name) not in (None, rec):
                error(f"part {name} does not match what was written")
                return
        self.jobs.add(job)
        job.state = JobState.WRITING
        try:
            if self.stores.is_root(store_url):
                partial, records = await asyncio.to_thread(
                    assemble_parts, self.cfg.root, run, tag, parts, inline, self._writes().blobs
                )
                manifest = self._writes().manifest(job, given, records)
                path = await asyncio.to_thread(commit, partial, manifest)
                job.committed_at = time.time()
                await self._writes().advance_latest(job)
            else:
                assert store_url is not None
                path = await self._commit_remote(
                    job, self.stores.get(store_url), parts, inline, given
                )
        except (OSError, CkptdError) as e:
            text = f"could not commit {job.key}: {e}"
            log.error(text)
            await self.jobs.fail(job, text)
            error(text)
            return
        await self.jobs.finish(job)
        self._uploads().retain(job)
        log.info("committed sharded checkpoint %s: %d parts, %.1f MiB -> %s",
                 job.key, len(parts), job.bytes_total / 2**20, path)  # fmt: skip
        client.send(Committed(rid=rid, tag=tag, path=path))

    async def _commit_remote(
        self,
        job: Job,
        store: Store,
        parts: dict[str, dict[str, Any]],
        inline: dict[str, bytes],
        given: dict[str, Any],
    ) -> str:
        prefix = join_key(job.run, "checkpoints", job.tag)
        found = {o.key.rsplit("/", 1)[-1]: o.size for o in await store.list(prefix + "/")}
        if "MANIFEST.json" in found:
            raise AlreadyExistsError(f"checkpoint {job.key} already exists in {store.url}")
        shared = {}
        if any("blob" in rec for rec in parts.values()):
            base = join_key(job.run, BLOB_DIR)
            shared = {o.key[len(base) + 1 :]: o.size for o in await store.list(base + "/")}
        for name, rec in parts.items():
            if "blob" in rec:
                blob = blob_file(name, rec["blob"])
                job.blobs.add(blob)
                if shared.get(blob) != int(rec["size"]):
                    raise PermanentStorageError(
                        f"part {name} of {job.key} is not in {store.url}/{BLOB_DIR} with "
                        f"{rec['size']} bytes (found {shared.get(blob)})"
                    )
                continue
            if found.get(name) != int(rec["size"]):
                raise PermanentStorageError(
                    f"part {name} of {job.key} is not in {store.url} with {rec['size']} bytes "
                    f"(found {found.get(name)})"
                )
        records = {name: dict(rec) for name, rec in parts.items()}
        for name, data in inline.items():
            await store.put_bytes(join_key(prefix, name), data)
            records[name] = {"size": len(data), "crc32c": crc_hex(crc32c.crc32c(data))}
        job.state = JobState.UPLOADING
        manifest = self._writes().manifest(job, given, records)
        body = json.dumps(manifest, indent=1).encode()
        await store.put_bytes(join_key(prefix, "MANIFEST.json"), body, if_absent=True)
        job.committed_at = time.time()
        # Parts of an earlier attempt at this tag (a rank died, another world size) are not in
        # the manifest, so no reader looks at them; delete them now that the commit holds.
        for name in found.keys() - records.keys() - {"MANIFEST.json"}:
            with contextlib.suppress(CkptdError, OSError):
                await store.delete(join_key(prefix, name))
        assert job.store is not None
        await self.stores.advance_latest(job.store, job.run, job.tag, job.step)
        return join_key(store.url, prefix)


def _part_records(raw: dict[Any, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, rec in raw.items():
        if not isinstance(name, str) or not isinstance(rec, dict):
            raise ProtocolError(f"bad part {name!r}")
        check_data_name(name)
        size, crc = rec.get("size"), rec.get("crc32c")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProtocolError(f"part {name}: size must be a non-negative int")
        if not isinstance(crc, str) or not _CRC.fullmatch(crc):
            raise ProtocolError(f"part {name}: crc32c must be 8 hex digits")
        out[name] = {"size": size, "crc32c": crc}
        if "blob" in rec:
            if not is_digest(rec["blob"]):
                raise ProtocolError(f"part {name}: blob must be a content digest")
            out[name]["blob"] = rec["blob"]
    return out


async def _plain(fn: Callable[[], Any], *, what: str) -> Any:
    """No retry here: the store retries each request itself."""
    return await fn()
