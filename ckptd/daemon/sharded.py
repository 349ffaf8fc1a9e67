"""Sharded (DCP) checkpoints in the daemon: one rank's part at a time, then the global commit.

Each rank of a ``torch.distributed.checkpoint`` save hands its node's daemon one file (a *part*).
The daemon writes it among its parts (``<root>/.ckptd/parts/``, hidden from listings) and, when
the store is elsewhere, uploads it to its final place in the store. Nothing is visible until the
coordinating rank sends ``commit`` with every part: the daemon checks that each is in place with
the size its rank reported, then writes the metadata, ``MANIFEST.json`` last, and ``latest``.
A part whose rank went away is dropped: DCP cannot commit without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any

import crc32c

from ..errors import CkptdError, NotFoundError, PermanentStorageError, ProtocolError
from ..names import check_name
from ..protocol import field as msg_field
from ..storage import Store, join_key
from .commit import StagedFile, assemble_parts, commit, crc_hex, parts_dir, write_part
from .jobs import Job, JobState
from .lease import SlotLease
from .upload import journal_dir, update_remote_latest

if TYPE_CHECKING:
    from .connections import Client
    from .server import Daemon

log = logging.getLogger("ckptd.daemon")

_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,200}\.(safetensors|msgpack)$")
_META_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,200}\.json$")


class ShardedCommits:
    """The daemon's part of sharded saves; mixed into ``Daemon`` (``self`` is the daemon)."""

    async def _write_part(
        self: Daemon, job: Job, f: StagedFile, lease: SlotLease, slot: Any
    ) -> None:
        """One rank's file: fsync it among this daemon's parts, then upload it if the store is
        elsewhere. The checkpoint stays invisible until a ``commit`` request lists every part."""
        conn = self._conns.get(job.client or -1)
        try:
            with lease:
                async with self._write_sem:
                    job.state = JobState.WRITING

                    def progress(n: int) -> None:
                        job.bytes_written += n
                        self._bytes_written_total += n

                    path, record = await asyncio.to_thread(
                        write_part, self.cfg.root, job.run, job.tag, f, lease, progress
                    )
        except (OSError, CkptdError) as e:
            msg = f"could not write {job.key}: {e}"
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                msg = f"could not write {job.key}: the disk under {self.cfg.root} is full"
            log.error(msg)
            await self._fail(job, msg, released=True, slot=slot)
            return
        await self._send(conn, {"ev": "released", "id": job.save_id, "slot": slot})
        job.files = {f.name: record}
        if await self._drop_orphan_part(job):
            return
        job.state = JobState.COMMITTED
        job.committed_at = time.time()
        log.info("wrote part %s: %.1f MiB", job.key, job.bytes_total / 2**20)
        await self._send(
            conn,
            {
                "ev": "committed",
                "id": job.save_id,
                "tag": job.tag,
                "path": path,
                "files": job.files,
            },
        )
        if job.store is not None and not self._store_is_root(job.store):
            self._enqueue_upload(job)
        else:
            await self._finish(job)

    async def _drop_orphan_part(self: Daemon, job: Job) -> bool:
        """A part whose rank has gone can never be committed (DCP's gather fails without it):
        drop it rather than fill the disk and the store with bytes nobody will list."""
        conn = self._conns.get(job.client or -1)
        if conn is not None and conn.alive:
            return False
        job.state = JobState.DROPPED
        job.error = "its rank disconnected before the part was confirmed; the save cannot commit"
        log.warning("dropping part %s: %s", job.key, job.error)
        path = os.path.join(parts_dir(self.cfg.root, job.run, job.tag), job.part or "")
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, path)
        await self._changed()
        return True

    async def _upload_part(
        self: Daemon, job: Job, store: Store, retrying: Any, progress: Any
    ) -> None:
        """A part goes to its final place in the store; the local copy is only staging."""
        prefix = join_key(job.run, "checkpoints", job.tag)
        try:
            await store.get_bytes(join_key(prefix, "MANIFEST.json"), start=0, end=1)
        except NotFoundError:
            pass
        else:
            raise PermanentStorageError(
                f"checkpoint {job.run}@{job.tag} already exists in {job.store}; "
                "tags are never overwritten"
            )
        assert job.part is not None
        rec = job.files[job.part]
        path = os.path.join(parts_dir(self.cfg.root, job.run, job.tag), job.part)
        jdir = journal_dir(self.cfg.root, job.run, job.tag)
        await asyncio.to_thread(os.makedirs, jdir, exist_ok=True)
        await retrying(
            lambda: store.put_file(
                join_key(prefix, job.part or ""),
                path,
                size=int(rec["size"]),
                crc32c=int(rec["crc32c"], 16),
                journal=os.path.join(jdir, f"{job.part}.json"),
                progress=progress,
            ),
            what=f"upload {job.key}",
        )
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, path)
        with contextlib.suppress(OSError):  # empty once every part of this node is up
            os.rmdir(jdir)

    async def _reply_commit(self: Daemon, conn: Client, msg: dict[str, Any]) -> None:
        """The global commit of a sharded checkpoint, asked by its coordinating rank once every
        rank's part is committed (local root) or uploaded (store): the metadata, then
        MANIFEST.json last, then ``latest``. Parts are checked to be in place first."""
        rid = msg.get("rid")
        try:
            run = check_name(msg_field(msg, "run", str), "run")
            tag = check_name(msg_field(msg, "tag", str), "tag")
            step = msg_field(msg, "step", int)
            store_url = msg_field(msg, "store", str, optional=True) or conn.store or self.cfg.store
            parts = _part_records(msg_field(msg, "parts", dict))
            inline = msg_field(msg, "inline", dict, optional=True) or {}
            for name, data in inline.items():
                if not isinstance(data, bytes) or not _META_NAME.match(str(name)) or name in parts:
                    raise ProtocolError(f"bad inline file {name!r}")
            given = msg_field(msg, "manifest", dict, optional=True) or {}
        except ProtocolError as e:
            await self._send(conn, {"ev": "error", "rid": rid, "error": str(e)})
            return
        job = Job(run=run, tag=tag, step=step, store=store_url, client=conn.id)
        job.bytes_total = sum(int(r["size"]) for r in parts.values())
        if self._closing:
            await self._send(
                conn, {"ev": "error", "rid": rid, "error": "the daemon is shutting down"}
            )
            return
        if (old := self.jobs.get(job.key)) is not None and old.pending:
            await self._send(
                conn, {"ev": "error", "rid": rid, "error": f"{job.key} is already being saved"}
            )
            return
        for name, rec in parts.items():  # what this daemon wrote itself must match the claim
            mine = self.jobs.get(f"{job.key}#{name}")
            if mine is not None and mine.files.get(name) not in (None, rec):
                await self._send(
                    conn,
                    {
                        "ev": "error",
                        "rid": rid,
                        "error": f"part {name} does not match what was written",
                    },
                )
                return
        self._add_job(job)
        job.state = JobState.WRITING
        try:
            if store_url is None or self._store_is_root(store_url):
                partial, records = await asyncio.to_thread(
                    assemble_parts, self.cfg.root, run, tag, parts, inline
                )
                manifest = self._manifest(job, given, records)
                path = await asyncio.to_thread(commit, partial, manifest)
                job.committed_at = time.time()
                await self._maybe_update_latest(job)
                await self._finish(job)
                self._spawn(self._retain(job))
            else:
                path = await self._commit_remote(job, self._store(store_url), parts, inline, given)
        except (OSError, CkptdError) as e:
            job.state = JobState.FAILED
            job.error = f"could not commit {job.key}: {e}"
            log.error(job.error)
            await self._changed()
            await self._send(conn, {"ev": "error", "rid": rid, "error": job.error})
            return
        log.info("committed sharded checkpoint %s: %d parts, %.1f MiB -> %s",
                 job.key, len(parts), job.bytes_total / 2**20, path)  # fmt: skip
        await self._send(conn, {"ev": "committed", "rid": rid, "tag": tag, "path": path})

    async def _commit_remote(
        self: Daemon,
        job: Job,
        store: Store,
        parts: dict[str, dict[str, Any]],
        inline: dict[str, bytes],
        given: dict[str, Any],
    ) -> str:
        from ..storage.retry import with_retries

        def retrying(fn: Any, *, what: str) -> Any:
            return with_retries(fn, what=what)

        prefix = join_key(job.run, "checkpoints", job.tag)
        found = {o.key.rsplit("/", 1)[-1]: o.size for o in await store.list(prefix + "/")}
        if "MANIFEST.json" in found:
            raise PermanentStorageError(f"checkpoint {job.key} already exists in {store.url}")
        for name, rec in parts.items():
            if found.get(name) != int(rec["size"]):
                raise PermanentStorageError(
                    f"part {name} of {job.key} is not in {store.url} with {rec['size']} bytes "
                    f"(found {found.get(name)})"
                )
        records = {name: dict(rec) for name, rec in parts.items()}
        for name, data in inline.items():
            await retrying(lambda n=name, d=data: store.put_bytes(join_key(prefix, n), d),
                           what=f"upload {job.key}/{name}")  # fmt: skip
            records[name] = {"size": len(data), "crc32c": crc_hex(crc32c.crc32c(data))}
        job.state = JobState.UPLOADING
        manifest = self._manifest(job, given, records)
        body = json.dumps(manifest, indent=1).encode()
        await retrying(
            lambda: store.put_bytes(join_key(prefix, "MANIFEST.json"), body, if_absent=True),
            what=f"upload {job.key}/MANIFEST.json",
        )
        job.committed_at = time.time()
        # Parts of an earlier attempt at this tag (a rank died, another world size) are not in
        # the manifest, so no reader looks at them; delete them now that the commit holds.
        for name in found.keys() - records.keys() - {"MANIFEST.json"}:
            with contextlib.suppress(CkptdError, OSError):
                await store.delete(join_key(prefix, name))
        key = f"{job.store}\0{job.run}"
        async with self._remote_latest_lock:
            if job.step >= self._remote_latest.get(key, -1):
                await update_remote_latest(store, job.run, job.tag, retrying)
                self._remote_latest[key] = job.step
        await self._finish(job)
        self._spawn(self._retain(job))
        return join_key(store.url, prefix)


def _part_records(raw: dict[Any, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, rec in raw.items():
        if not isinstance(name, str) or not _FILE_NAME.match(name) or not isinstance(rec, dict):
            raise ProtocolError(f"bad part {name!r}")
        size, crc = rec.get("size"), rec.get("crc32c")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProtocolError(f"part {name}: size must be a non-negative int")
        if not isinstance(crc, str) or not re.fullmatch(r"[0-9a-f]{8}", crc):
            raise ProtocolError(f"part {name}: crc32c must be 8 hex digits")
        out[name] = {"size": size, "crc32c": crc}
    if not out:
        raise ProtocolError("a commit lists no parts")
    return out
