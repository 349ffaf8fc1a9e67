"""``ckptd serve``: one asyncio program that commits staged saves and uploads them.

Pipeline per save: connection reads the request -> write stage (bounded by ``writers``, file
writes in threads) -> local commit -> upload stage (bounded by ``uploads``) -> events back to the
client that sent it. Every client is independent: a malformed message or a dead client drops its
own connection only. State that must survive a crash is on disk (see ``commit`` and ``upload``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import shutil
import signal
import socket
import stat
import time
from dataclasses import dataclass, field
from typing import Any

from .. import __version__, retention
from ..errors import (
    AlreadyExistsError,
    CkptdError,
    ConfigError,
    IntegrityError,
    NotFoundError,
    PermanentStorageError,
    ProtocolError,
    StorageError,
)
from ..header import FORMAT, decode_header
from ..names import check_name
from ..protocol import FrameReader
from ..protocol import field as msg_field
from ..retention import Retention
from ..storage import Store, is_local, join_key, local_path, open_store
from . import recovery, sdnotify
from .commit import (
    StagedFile,
    commit,
    update_latest,
    write_staged,
)
from .connections import Client, ClientServer
from .jobs import FINAL, Job, JobState
from .lease import BytesSource, SlotLease
from .mirror import Mirrors
from .preempt import PreemptionConfig, watch_preemption
from .sharded import _FILE_NAME, ShardedCommits
from .upload import (
    clear_record,
    pending_records,
    update_remote_latest,
    upload_checkpoint,
    write_record,
)

log = logging.getLogger("ckptd.daemon")

_MAX_SLOTS = 64
_MAX_SLOT_SIZE = 1 << 42
_KEEP_FINISHED = 200
_STORE_CHECK_TIMEOUT = 5.0


@dataclass(kw_only=True)
class DaemonConfig:
    root: str
    """Local directory: checkpoints are committed here first (and it is the store by default)."""
    socket: str
    """Unix socket path clients connect to; created owner-only."""
    store: str | None = None
    """Default store URL for runs whose client names none; None: the root is the store."""
    writers: int = 2
    """Checkpoints written to local disk at once."""
    uploads: int = 2
    """Checkpoints uploaded at once (each with ``file_concurrency`` files in flight)."""
    file_concurrency: int = 4
    drain_timeout: float = 80.0
    """SIGTERM's upper bound for finishing uploads: below systemd's 90 s and AWS spot's 120 s."""
    check_store: bool = True
    """Probe the default store at start and refuse to run if it is unusable."""
    retention: Retention = field(default_factory=Retention)
    """What to keep in the store (and in the root, when the root is the store)."""
    local_retention: Retention = field(default_factory=Retention)
    """What to keep in the root when uploading elsewhere; only uploaded copies are deleted."""
    preemption: PreemptionConfig | None = None
    """Spot/preemption notices to watch; None watches nothing."""
    group: str | None = None
    """A group to share the socket and the files with (read-only for files); None: owner-only,
    because checkpoints are the user's weights and other local users must not read them."""
    mirror_max_file_size: int | None = 1 << 30
    """Experiment files larger than this are not mirrored (logged); None: no cap."""
    gid: int = field(default=-1, init=False)

    def __post_init__(self) -> None:
        if self.writers < 1 or self.uploads < 1 or self.file_concurrency < 1:
            raise ConfigError("writers, uploads and file_concurrency must be at least 1")
        if self.drain_timeout <= 0:
            raise ConfigError("drain_timeout must be positive: an unbounded drain outlives the VM")
        if self.group is not None:
            try:
                self.gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise ConfigError(f"no group named {self.group!r} on this machine") from None
        self.root = os.path.abspath(os.path.expanduser(self.root))
        self.socket = os.path.abspath(os.path.expanduser(self.socket))


class Daemon(ShardedCommits):
    def __init__(self, config: DaemonConfig) -> None:
        self.cfg = config
        self.jobs: dict[str, Job] = {}
        self.net = ClientServer(
            config.socket,
            gid=config.gid if config.group is not None else None,
            dispatch=self._dispatch,
            on_drop=self._on_drop,
            spawn=self._spawn,
        )
        self._conns = self.net.clients  # id -> Client, owned by the client server
        self._write_sem = asyncio.Semaphore(config.writers)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._upload_queue: list[Job] = []
        self._upload_wake = asyncio.Event()
        self._change = asyncio.Condition()
        self._stores: dict[str, Store] = {}
        self._latest_step: dict[str, int] = {}
        self._latest_lock = asyncio.Lock()
        self._remote_latest: dict[str, int] = {}
        self._remote_latest_lock = asyncio.Lock()  # store+run -> newest step uploaded
        self._served: dict[str, float] = {}  # run -> when its last upload started (fairness)
        self._writers: dict[str, int] = {}  # run -> id of the connection that saves it
        self._closing = False
        self._stop = asyncio.Event()
        self._critical: set[asyncio.Task[Any]] = set()
        self.fatal = False
        self.mirrors = Mirrors(
            self._store, config.store or config.root, max_file_size=config.mirror_max_file_size
        )
        self._lock_fd: int | None = None
        self._started = time.time()
        self._bytes_written_total = 0
        self._bytes_uploaded_total = 0
        self.preempted = False

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; exit code 0 only if nothing was left un-uploaded."""
        self._prepare_root()
        if self.cfg.store and self.cfg.check_store and not self._store_is_root(self.cfg.store):
            store = self._store(self.cfg.store)
            await store.check_access()
        self._rescan()
        self.net.listen()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        self._spawn(self.net.accept_loop(), critical=True)
        for _ in range(self.cfg.uploads):
            self._spawn(self._upload_worker(), critical=True)
        if self.cfg.preemption is not None:
            self._spawn(watch_preemption(self.cfg.preemption, self.on_preemption_notice))
        if (interval := sdnotify.watchdog_interval()) is not None:
            self._spawn(self._watchdog(interval))
        sdnotify.notify("READY=1", f"STATUS=serving {self.cfg.socket}")
        log.info(
            "ckptd %s serving on %s, root %s, store %s",
            __version__,
            self.cfg.socket,
            self.cfg.root,
            self.cfg.store or "(the root)",
        )
        await self._stop.wait()
        return await self._shutdown()

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("stop requested: no new saves, finishing staged work, draining uploads")
            self._stop.set()

    async def _shutdown(self) -> int:
        self._closing = True
        sdnotify.notify(
            "STOPPING=1",
            "STATUS=draining",
            f"EXTEND_TIMEOUT_USEC={int((self.cfg.drain_timeout + 10) * 1e6)}",
        )
        self.net.close()
        deadline = time.monotonic() + self.cfg.drain_timeout
        extender = self._spawn(self._extend_stop_timeout(deadline))
        ok, left = await self.drain(deadline - time.monotonic())
        if not await self.mirrors.stop_all(0):
            ok = False
            log.error("experiment records not uploaded: %s", self.mirrors.pending())
        extender.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.net.close_all()
        for store in self._stores.values():
            with contextlib.suppress(CkptdError, OSError):
                await store.close()
        if self.fatal:
            log.error("exiting 1 after an internal failure; committed work resumes on restart")
            return 1
        if ok:
            log.info("drained: everything committed and uploaded; exiting 0")
            return 0
        for job in left:
            log.error("left behind: %s %s (%s)", job.key, job.state, job.error or "not finished")
        log.error(
            "%d checkpoint(s) not uploaded at exit; they stay in %s and resume on restart",
            len(left),
            self.cfg.root,
        )
        return 1

    async def _extend_stop_timeout(self, deadline: float) -> None:
        while True:
            left = max(deadline - time.monotonic(), 1.0)
            sdnotify.notify(f"EXTEND_TIMEOUT_USEC={int((left + 10) * 1e6)}")
            await asyncio.sleep(5)

    async def _watchdog(self, interval: float) -> None:
        while not self.fatal:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def _spawn(self, coro: Any, *, critical: bool = False) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        if critical:
            self._critical.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.error("internal task failed: %r", exc, exc_info=exc)
        if task in self._critical:
            self._critical.discard(task)
            if not self._stop.is_set():
                # A daemon without its accept loop or upload workers only looks alive: exit
                # non-zero (committed work stays on disk) so that systemd restarts it.
                log.critical("internal loop %s stopped (%r); exiting so that it is restarted",
                             task.get_coro(), exc)  # fmt: skip
                self.fatal = True
                self._stop.set()

    # ---- root, lock, rescan ----------------------------------------------------------------

    def _prepare_root(self) -> None:
        gid = self.cfg.gid if self.cfg.group is not None else None
        self._lock_fd = recovery.prepare_root(self.cfg.root, gid=gid)

    def _rescan(self) -> None:
        """Drop what a crash left half-written; queue the uploads still owed."""
        for owed in recovery.rescan(self.cfg.root):
            job = Job(run=owed.run, tag=owed.tag, step=owed.step, store=owed.store,
                      state=JobState.COMMITTED)  # fmt: skip
            job.committed_at = time.time()
            self._add_job(job)
            self._enqueue_upload(job)

    # ---- socket ------------------------------------------------------------------------------

    async def _refuse(self, conn: Client, msg: dict[str, Any], error: str) -> None:
        """Tell the client why its message was refused, as the reply it waits for."""
        log.warning("client %d (pid %s): refused %r: %s", conn.id, conn.pid, msg.get("op"), error)
        if msg.get("op") == "save" and isinstance(msg.get("id"), int):
            await self._send(conn, {"ev": "released", "id": msg["id"], "slot": msg.get("slot")})
            await self._send(conn, {"ev": "failed", "id": msg["id"], "error": error})
        else:
            await self._send(conn, {"ev": "error", "rid": msg.get("rid"), "error": error})

    def _on_drop(self, conn: Client) -> None:
        for run in [r for r, cid in self._writers.items() if cid == conn.id]:
            del self._writers[run]
        self.mirrors.release(conn.id)  # flush what it wrote (even after a crash), stop watching

    async def _send(self, conn: Client | None, msg: dict[str, Any]) -> None:
        if conn is not None:
            conn.send(msg)

    async def _dispatch(self, conn: Client, msg: dict[str, Any], reader: FrameReader) -> None:
        try:
            await self._handle(conn, msg, reader)
        except ConfigError as e:  # e.g. a bad name: answer it, keep the client
            await self._refuse(conn, msg, str(e))

    async def _handle(self, conn: Client, msg: dict[str, Any], reader: FrameReader) -> None:
        op = msg_field(msg, "op", str)
        if op == "hello":
            conn.pid = msg_field(msg, "pid", int, optional=True)
            run = msg_field(msg, "run", str, optional=True)
            conn.run = check_name(run, "run") if run else None
            store = msg_field(msg, "store", str, optional=True)
            if store:
                self._store(store)  # validates the URL now, not at the first upload
            conn.store = store
            await self._send(conn, self._welcome(msg))
        elif op == "slot":
            self._on_slot(conn, msg, reader)
        elif op == "save":
            self._on_save(conn, msg)
        elif op == "status":
            await self._send(conn, {"ev": "status", "rid": msg.get("rid"), **self.status()})
        elif op == "drain":
            timeout = msg_field(msg, "timeout", (int, float), optional=True)
            self._spawn(self._reply_drain(conn, msg.get("rid"), timeout))
        elif op == "mirror":
            self._spawn(self._reply_mirror(conn, msg))
        elif op == "commit":
            self._spawn(self._reply_commit(conn, msg))
        elif op == "bye":
            raise ConnectionResetError("client said bye")
        else:
            raise ProtocolError(f"unknown op {op!r}")

    async def _reply_mirror(self, conn: Client, msg: dict[str, Any]) -> None:
        try:
            reply = await self.mirrors.handle(msg, client=conn.id)
        except (CkptdError, OSError) as e:  # bad run/dir/action, or no inotify watch left
            reply = {"ev": "error", "error": f"cannot mirror: {e}"}
        await self._send(conn, {**reply, "rid": msg.get("rid")})

    def _welcome(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {
            "ev": "welcome",
            "rid": msg.get("rid"),
            "version": __version__,
            "root": self.cfg.root,
            "store": self.cfg.store,
            "pid": os.getpid(),
            "preempted": self.preempted,
            "features": ["mirror", "parts"],
        }

    def _on_slot(self, conn: Client, msg: dict[str, Any], reader: FrameReader) -> None:
        if not reader.fds:
            raise ProtocolError("slot message without a file descriptor")
        fd = reader.fds.popleft()
        try:
            index = msg_field(msg, "slot", int)
            size = msg_field(msg, "size", int)
            gen = msg_field(msg, "generation", int)
            if not 0 <= index < _MAX_SLOTS or not 0 < size <= _MAX_SLOT_SIZE:
                raise ProtocolError(f"slot {index} of {size} bytes is out of range")
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < size:
                raise ProtocolError(f"slot {index}: descriptor is not a {size} byte memory file")
        except (ProtocolError, OSError):
            os.close(fd)
            raise
        conn.set_slot(index, fd, size, gen)

    def _on_save(self, conn: Client, msg: dict[str, Any]) -> None:
        save_id = msg_field(msg, "id", int)
        run = check_name(msg_field(msg, "run", str), "run")
        tag = check_name(msg_field(msg, "tag", str), "tag")
        step = msg_field(msg, "step", int)
        store = msg_field(msg, "store", str, optional=True) or conn.store or self.cfg.store
        manifest_in = msg_field(msg, "manifest", dict, optional=True) or {}
        files, inline, lease, total = self._validate_files(conn, msg)
        job = Job(run=run, tag=tag, step=step, store=store, client=conn.id, save_id=save_id)
        job.bytes_total = total
        if msg_field(msg, "part", bool, optional=True):
            if len(files) != 1 or inline or lease is None:
                if lease is not None:
                    lease.close()
                raise ProtocolError("a part save carries exactly one staged file")
            job.part = files[0].name
        refusal = None
        if self._closing:
            refusal = "the daemon is shutting down; save refused"
        else:
            # A whole save or commit of the tag in progress blocks a part too, and vice versa.
            for key in dict.fromkeys((f"{run}@{tag}", job.key)):
                if (old := self.jobs.get(key)) is not None and old.pending:
                    refusal = f"{key} is already being saved"
                    break
            if refusal is None and job.part is None:
                refusal = self._claim_writer(conn, run)
        if refusal is not None:
            if lease is not None:
                lease.close()
            self._spawn(self._fail(job, refusal, released=True, slot=msg.get("slot")))
            return
        self._add_job(job)
        if job.part is not None:
            assert lease is not None
            self._spawn(self._write_part(job, files[0], lease, msg.get("slot")))
        else:
            self._spawn(self._write(job, files, inline, lease, msg.get("slot"), manifest_in))

    def _claim_writer(self, conn: Client, run: str) -> str | None:
        """One live writer per run: the first connection that saves whole checkpoints of a run
        holds it until it disconnects; another one is refused, naming the holder. (Ranks of a
        sharded save write parts of one run together and are not writers in this sense.)"""
        holder = self._conns.get(self._writers.get(run, -1))
        if holder is None or not holder.alive or holder is conn:
            self._writers[run] = conn.id
            return None
        return (
            f"run {run} already has a live writer on this node (pid {holder.pid}, host "
            f"{socket.gethostname()}); two trainers on one run would drop each other's saves. "
            "Stop the other one or use another run name"
        )

    def _validate_files(
        self, conn: Client, msg: dict[str, Any]
    ) -> tuple[list[StagedFile], dict[str, bytes], SlotLease | None, int]:
        raw_files = msg_field(msg, "files", list)
        raw_inline = msg_field(msg, "inline", dict, optional=True) or {}
        names: set[str] = set()
        files: list[StagedFile] = []
        lease: SlotLease | None = None
        slot_size = 0
        if raw_files:
            index = msg_field(msg, "slot", int)
            if index not in conn.slots:
                raise ProtocolError(f"save names slot {index}, which this client never sent")
            fd, slot_size, gen = conn.slots[index]
            if msg_field(msg, "generation", int) != gen:
                raise ProtocolError(
                    f"save names generation {msg['generation']} of slot {index}, not {gen}"
                )
            # The job keeps the memory alive even if the client dies or replaces the slot now.
            lease = SlotLease(fd, slot_size, label=f"slot {index} of client {conn.id}")
        total = 0
        try:
            for raw in raw_files:
                if not isinstance(raw, dict):
                    raise ProtocolError("files entries must be maps")
                name = msg_field(raw, "name", str)
                header = msg_field(raw, "header", bytes)
                offset = msg_field(raw, "offset", int)
                size = msg_field(raw, "size", int)
                if not _FILE_NAME.match(name) or name in names:
                    raise ProtocolError(f"bad or repeated file name {name!r}")
                raw_segments = msg_field(raw, "segments", list, optional=True)
                segments = None
                pieces = [(offset, size)]
                if raw_segments is not None:
                    segments = pieces = _segments(name, raw_segments, size)
                for o, n in pieces:
                    if o < 0 or n < 0 or o + n > slot_size:
                        raise ProtocolError(
                            f"{name}: bytes [{o}, {o + n}) lie outside the {slot_size} byte slot"
                        )
                try:
                    decode_header(header, len(header) + size)
                except CkptdError as e:
                    raise ProtocolError(f"{name}: {e}") from e
                names.add(name)
                files.append(StagedFile(name, header, offset, size, segments))
                total += len(header) + size
            inline: dict[str, bytes] = {}
            for name, data in raw_inline.items():
                if not isinstance(name, str) or not isinstance(data, bytes):
                    raise ProtocolError("inline files must map names to bytes")
                if not _FILE_NAME.match(name) or name in names:
                    raise ProtocolError(f"bad or repeated file name {name!r}")
                names.add(name)
                inline[name] = data
                total += len(data)
        except ProtocolError:
            if lease is not None:
                lease.close()
            raise
        if not names:
            if lease is not None:
                lease.close()
            raise ProtocolError("save with no files")
        return files, inline, lease, total

    # ---- write stage ---------------------------------------------------------------------------

    async def _write(
        self,
        job: Job,
        files: list[StagedFile],
        inline: dict[str, bytes],
        lease: SlotLease | None,
        slot: Any,
        manifest_in: dict[str, Any],
    ) -> None:
        conn = self._conns.get(job.client or -1)
        released = False
        partial: str | None = None
        uploading = job.store is not None and not self._store_is_root(job.store)
        # The tag check covers the store, not only this root (a rerun on a fresh machine), and
        # runs while the files are written, so it costs the save no time.
        taken = asyncio.ensure_future(self._taken_in_store(job)) if uploading else None
        try:
            async with self._write_sem:
                job.state = JobState.WRITING

                def progress(n: int) -> None:
                    job.bytes_written += n
                    self._bytes_written_total += n

                source = lease or BytesSource(b"")
                with lease or contextlib.nullcontext():  # closed on every path, cancel included
                    partial, records = await asyncio.to_thread(
                        write_staged,
                        *(self.cfg.root, job.run, job.tag, files, inline, source, progress),
                    )
                released = True
                await self._send(conn, {"ev": "released", "id": job.save_id, "slot": slot})
                if taken is not None and (holder := await taken) is not None:
                    raise AlreadyExistsError(
                        f"checkpoint {job.key} already exists in {holder}; tags are never "
                        "overwritten (resume with restore() to continue that run, or use a new "
                        "run name)"
                    )
                manifest = self._manifest(job, manifest_in, records)
                if uploading:
                    assert job.store is not None
                    await asyncio.to_thread(
                        write_record, self.cfg.root, job.run, job.tag, job.store
                    )
                final = await asyncio.to_thread(commit, partial, manifest)
                partial = None
                await self._maybe_update_latest(job)
        except (OSError, CkptdError) as e:
            if taken is not None:
                taken.cancel()
            msg = f"could not commit {job.key}: {e}"
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                msg = f"could not commit {job.key}: the disk under {self.cfg.root} is full"
            if partial:
                shutil.rmtree(partial, ignore_errors=True)
            log.error(msg)
            await self._fail(job, msg, released=not released, slot=slot)
            return
        except Exception as e:  # a bug in one save must not hang its client
            log.exception("internal error while committing %s", job.key)
            if partial:
                shutil.rmtree(partial, ignore_errors=True)
            msg = f"internal error while committing {job.key}: {e!r}"
            await self._fail(job, msg, released=not released, slot=slot)
            return
        job.state = JobState.COMMITTED
        job.committed_at = time.time()
        took = job.committed_at - job.created
        log.info(
            "committed %s: %.1f MiB in %.2f s (%.0f MiB/s) -> %s",
            job.key, job.bytes_total / 2**20, took, job.bytes_total / 2**20 / max(took, 1e-6), final,
        )  # fmt: skip
        await self._send(
            conn, {"ev": "committed", "id": job.save_id, "tag": job.tag, "path": final}
        )
        if uploading:
            self._enqueue_upload(job)
        else:
            await self._finish(job)
            self._spawn(self._retain(job))

    async def _taken_in_store(self, job: Job) -> str | None:
        """The store URL if it already holds a manifest for this tag, else None.

        A store that cannot be asked within a few seconds does not hold up the commit: the
        upload stage asks again before it writes anything, and writes the manifest create-only.
        """
        assert job.store is not None
        key = join_key(job.run, "checkpoints", job.tag, "MANIFEST.json")
        store = self._store(job.store)
        try:
            await asyncio.wait_for(store.get_bytes(key), timeout=_STORE_CHECK_TIMEOUT)
        except NotFoundError:
            return None
        except (TimeoutError, StorageError, OSError) as e:
            log.info("could not ask %s whether %s exists (%s); the upload checks again",
                     job.store, job.key, e)  # fmt: skip
            return None
        return store.url

    def _manifest(self, job: Job, given: dict[str, Any], files: dict[str, Any]) -> dict[str, Any]:
        allowed = (
            "training_iteration",
            "metrics",
            "model_config",
            "git_commit",
            "rank",
            "world_size",
            "kind",
            "dcp",
            "meta",
            "torch_version",
            "host",
            "pid",
        )
        manifest = {k: given[k] for k in allowed if k in given}
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
        return manifest

    async def _maybe_update_latest(self, job: Job) -> None:
        async with self._latest_lock:  # concurrent writers must not race on one pointer
            newest = self._latest_step.get(job.run)
            if newest is None:
                newest = await asyncio.to_thread(recovery.latest_step, self.cfg.root, job.run)
            if job.step >= newest:
                await asyncio.to_thread(update_latest, self.cfg.root, job.run, job.tag)
                self._latest_step[job.run] = job.step
            else:
                self._latest_step[job.run] = newest

    # ---- upload stage ----------------------------------------------------------------------------

    def _store_is_root(self, url: str) -> bool:
        return is_local(url) and local_path(url) == self.cfg.root

    def _store(self, url: str) -> Store:
        store = self._stores.get(url)
        if store is None:
            store = self._stores[url] = open_store(url)
        return store

    def _enqueue_upload(self, job: Job) -> None:
        self._upload_queue.append(job)
        self._upload_wake.set()

    def _next_upload(self) -> Job | None:
        """Newest first under preemption; otherwise the run served least recently (fair share)."""
        if self.preempted:
            self._drop_superseded()
        if not self._upload_queue:
            return None
        if self.preempted:
            job = max(self._upload_queue, key=lambda j: j.step)
        else:
            job = min(self._upload_queue, key=lambda j: self._served.get(j.run, 0.0))
        self._upload_queue.remove(job)
        self._served[job.run] = time.monotonic()
        return job

    async def _upload_worker(self) -> None:
        from ..storage.retry import with_retries

        while True:
            job = self._next_upload()
            if job is None:
                self._upload_wake.clear()
                await self._upload_wake.wait()
                continue
            assert job.store is not None
            job.state = JobState.UPLOADING
            job.upload_started = job.upload_started or time.time()

            def progress(n: int, job: Job = job) -> None:
                job.bytes_uploaded += n
                self._bytes_uploaded_total += n

            def on_retry(attempt: int, exc: BaseException, job: Job = job) -> None:
                job.retries += 1
                job.error = str(exc)

            def retrying(fn: Any, *, what: str) -> Any:
                # The stores retry each part themselves; this outer layer only resumes a file.
                return with_retries(fn, what=what, on_retry=on_retry, attempts=2)

            try:
                store = self._store(job.store)
                job.bytes_uploaded = 0
                if job.part is not None:
                    if await self._drop_orphan_part(job):
                        continue
                    await self._upload_part(job, store, retrying, progress)
                    job.error = None
                    job.uploaded_at = time.time()
                    await self._finish(job)
                    continue
                await upload_checkpoint(
                    store,
                    self.cfg.root,
                    job.run,
                    job.tag,
                    file_concurrency=self.cfg.file_concurrency,
                    progress=progress,
                    with_retries=retrying,
                )
                key = f"{job.store}\0{job.run}"
                async with self._remote_latest_lock:  # check and write as one: never backwards
                    if job.step >= self._remote_latest.get(key, -1):
                        await update_remote_latest(store, job.run, job.tag, retrying)
                        self._remote_latest[key] = job.step
                await asyncio.to_thread(clear_record, self.cfg.root, job.run, job.tag)
            except (PermanentStorageError, AlreadyExistsError, IntegrityError) as e:
                # Retrying cannot help: the store refuses us, the tag is another writer's, or a
                # committed file no longer matches its manifest. Say so once; keep the local copy.
                job.error = f"upload of {job.key} to {job.store} failed: {e}"
                log.error("%s (the local copy stays in %s)", job.error, self.cfg.root)
                job.state = JobState.FAILED
                await self._notify_failed(job, job.error)
                continue
            except (StorageError, CkptdError, OSError) as e:
                job.error = f"upload of {job.key} to {job.store} interrupted: {e}"
                log.warning("%s; will retry", job.error)
                job.state = JobState.COMMITTED
                job.retries += 1
                self._spawn(self._requeue_later(job, min(60.0, 2.0 ** min(job.retries, 6))))
                continue
            job.error = None
            job.uploaded_at = time.time()
            took = job.uploaded_at - (job.upload_started or job.uploaded_at)
            log.info(
                "uploaded %s to %s: %.1f MiB in %.1f s (%.1f MiB/s), %d retries",
                job.key, job.store, job.bytes_total / 2**20, took,
                job.bytes_total / 2**20 / max(took, 1e-6), job.retries,
            )  # fmt: skip
            await self._finish(job)
            self._spawn(self._retain(job))

    async def _requeue_later(self, job: Job, delay: float) -> None:
        deadline = time.monotonic() + delay
        # A drain that starts meanwhile shortens the wait: the network may be back already.
        while time.monotonic() < deadline and not (self._closing and delay > 2):
            await asyncio.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
        if job.pending and job not in self._upload_queue:
            self._enqueue_upload(job)

    async def _retain(self, job: Job) -> None:
        """Apply retention to the run after one of its checkpoints reached its store."""
        pending = {j.tag for j in self.jobs.values() if j.run == job.run and j.pending}
        try:
            if job.store is None or self._store_is_root(job.store):
                if self.cfg.retention.active:
                    await retention.apply(self._store(self.cfg.root), job.run, self.cfg.retention,
                                          protect=pending)  # fmt: skip
                return
            if self.cfg.retention.active:
                await retention.apply(self._store(job.store), job.run, self.cfg.retention)
            if self.cfg.local_retention.active:
                owed = {tag for run, tag, _ in pending_records(self.cfg.root) if run == job.run}
                await retention.apply(self._store(self.cfg.root), job.run, self.cfg.local_retention,
                                      protect=pending | owed)  # fmt: skip
        except (CkptdError, OSError) as e:
            log.warning("retention for %s failed (nothing lost): %s", job.run, e)

    def _drop_superseded(self) -> None:
        """Under preemption, skip uploads that a newer committed checkpoint of the run supersedes.

        Only waiting uploads are dropped (an upload in flight finishes); the local copy stays.
        """
        newest: dict[str, int] = {}
        for j in self.jobs.values():
            if j.committed_at is not None and j.state != JobState.FAILED:
                newest[j.run] = max(newest.get(j.run, -1), j.step)
        for j in list(self.jobs.values()):
            if j.part is not None:  # a sharded save's commit waits for it: never drop one
                continue
            if j.state == JobState.COMMITTED and j.store and j.step < newest.get(j.run, -1):
                if j in self._upload_queue:
                    self._upload_queue.remove(j)
                j.state = JobState.DROPPED
                j.error = "superseded by a newer checkpoint during preemption (local copy kept)"
                clear_record(self.cfg.root, j.run, j.tag)
                log.warning("dropped upload of %s: a newer checkpoint supersedes it", j.key)

    async def on_preemption_notice(self, source: str, detail: str) -> None:
        """The machine is going away: tell clients, upload newest first, drop superseded uploads."""
        if self.preempted:
            return
        self.preempted = True
        log.warning("preemption notice from %s: %s; newest checkpoints first", source, detail)
        sdnotify.notify(f"STATUS=preempted ({source}); draining newest first")
        self._drop_superseded()
        for conn in list(self._conns.values()):
            await self._send(conn, {"ev": "preempted", "source": source, "detail": detail})
        await self._changed()

    async def _finish(self, job: Job) -> None:
        job.state = JobState.UPLOADED
        job.uploaded_at = time.time()
        await self._send(self._conns.get(job.client or -1), {"ev": "uploaded", "id": job.save_id})
        await self._changed()

    async def _fail(self, job: Job, error: str, *, released: bool, slot: Any) -> None:
        job.state = JobState.FAILED
        job.error = error
        conn = self._conns.get(job.client or -1)
        if released:
            await self._send(conn, {"ev": "released", "id": job.save_id, "slot": slot})
        await self._notify_failed(job, error)

    async def _notify_failed(self, job: Job, error: str) -> None:
        conn = self._conns.get(job.client or -1)
        await self._send(conn, {"ev": "failed", "id": job.save_id, "error": error})
        await self._changed()

    async def _changed(self) -> None:
        async with self._change:
            self._change.notify_all()

    def _add_job(self, job: Job) -> None:
        self.jobs[job.key] = job
        if len(self.jobs) > _KEEP_FINISHED * 2:
            done = [k for k, j in self.jobs.items() if j.state in FINAL]
            for k in done[: len(done) - _KEEP_FINISHED]:
                del self.jobs[k]

    # ---- status and drain ------------------------------------------------------------------------

    def unfinished(self) -> list[Job]:
        """Jobs still pending, and upload failures: checkpoints that are not in their store."""
        return [
            j
            for j in self.jobs.values()
            if j.pending or (j.state == JobState.FAILED and j.committed_at is not None)
        ]

    async def drain(self, timeout: float | None) -> tuple[bool, list[Job]]:
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)

        def settled() -> bool:
            return not any(j.pending for j in self.jobs.values())

        async with self._change:
            while not settled():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._change.wait(), timeout=min(left or 1.0, 1.0))
        left_s = None if deadline is None else max(0.0, deadline - time.monotonic())
        mirrored = await self.mirrors.flush_all(left_s)
        left_jobs = self.unfinished()
        return not left_jobs and mirrored, left_jobs

    async def _reply_drain(self, conn: Client, rid: Any, timeout: float | None) -> None:
        ok, left = await self.drain(timeout)
        await self._send(
            conn, {"ev": "drained", "rid": rid, "ok": ok, "pending": [j.as_dict() for j in left]}
        )

    def status(self) -> dict[str, Any]:
        jobs = sorted(self.jobs.values(), key=lambda j: j.created)
        counts: dict[str, int] = {}
        for j in jobs:
            counts[str(j.state)] = counts.get(str(j.state), 0) + 1
        uptime = time.time() - self._started
        return {
            "pid": os.getpid(),
            "version": __version__,
            "root": self.cfg.root,
            "socket": self.cfg.socket,
            "store": self.cfg.store,
            "uptime": uptime,
            "clients": len(self._conns),
            "closing": self._closing,
            "preempted": self.preempted,
            "counts": counts,
            "upload_queue": len(self._upload_queue),
            "bytes_written": self._bytes_written_total,
            "bytes_uploaded": self._bytes_uploaded_total,
            "mirrors": self.mirrors.pending(),
            "jobs": [j.as_dict() for j in jobs[-50:]],
        }


def _segments(name: str, raw: list[Any], size: int) -> list[tuple[int, int]]:
    out = []
    for seg in raw:
        if (
            not isinstance(seg, list | tuple)
            or len(seg) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in seg)
        ):
            raise ProtocolError(f"{name}: segments must be [offset, size] pairs")
        out.append((int(seg[0]), int(seg[1])))
    if sum(n for _, n in out) != size:
        raise ProtocolError(f"{name}: segments do not add up to {size} bytes")
    return out
