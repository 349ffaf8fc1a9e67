"""``ckptd serve``: one asyncio program that commits staged saves and uploads them.

This module only wires the stages together and answers the requests that are not saves. Read
the daemon in the order data flows:

    connections  the socket, framing, one Client per connection, every bound a client meets
    write        a save message -> files on local disk -> committed (whole saves and parts)
    uploads      one queue for committed checkpoints and parts -> the store; retention after
    sharded      the parts' uploads and the global commit of sharded (DCP) checkpoints
    jobs         the job table: the only place a job ends, the one admission check, drain
    recovery     the root's lock and the rescan at start
    stores       one store client per URL, the store's ``latest``
    commit, upload, lease, mirror, preempt, sdnotify: the pieces the stages use

Every client is independent: a malformed message or a dead client drops its own connection
only. State that must survive a crash is on disk (see ``commit`` and ``upload``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from typing import Any

from .. import __version__
from ..errors import CkptdError, ConfigError, ProtocolError
from ..names import check_name
from ..protocol import (
    ByeRequest,
    CommitRequest,
    Drained,
    DrainRequest,
    ErrorEvent,
    Failed,
    FrameReader,
    HelloRequest,
    MirrorRequest,
    Preempted,
    Released,
    SaveRequest,
    SlotRequest,
    StatusReport,
    StatusRequest,
    Welcome,
    parse_event,
    parse_request,
)
from . import recovery, sdnotify
from .config import DaemonConfig
from .connections import Client, ClientServer
from .jobs import Job, JobState, JobTable
from .metrics import MetricsServer, Snapshot
from .mirror import Mirrors
from .preempt import watch_preemption
from .sharded import ShardedCommits
from .stores import StoreSet
from .uploads import UploadStage
from .write import WriteStage, accept_slot, parse_save

log = logging.getLogger("ckptd.daemon")

__all__ = ["Daemon", "DaemonConfig"]


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.cfg = config
        self._tasks: set[asyncio.Task[Any]] = set()
        self._critical: set[asyncio.Task[Any]] = set()
        self.net = ClientServer(
            config.socket,
            gid=config.gid if config.group is not None else None,
            dispatch=self._dispatch,
            on_drop=self._on_drop,
            spawn=self._spawn,
        )
        self.jobs = JobTable(self.net.clients)
        self.stats = self.jobs.stats
        self.stores = StoreSet(config.root, options=config.store_options)
        self.sharded = ShardedCommits(
            config, self.jobs, self.stores, writes=lambda: self.writes, uploads=lambda: self.uploads
        )
        self.writes = WriteStage(
            config, self.jobs, self.stores, self.stats,
            committed=self._committed, orphaned=self.sharded.drop_if_orphan,
        )  # fmt: skip
        self.uploads = UploadStage(
            config, self.jobs, self.stores, self.stats,
            spawn=self._spawn, upload_part=self.sharded.upload_part,
            orphaned=self.sharded.drop_if_orphan,
        )  # fmt: skip
        # Records go through the same upload queue as checkpoints; the stores retry requests.
        self.mirrors = Mirrors(
            self.stores.get, config.store or config.root,
            max_file_size=config.mirror_max_file_size, transfer=self.uploads.transfer, attempts=1,
        )  # fmt: skip
        self._writers: dict[str, int] = {}  # run -> id of the connection that saves it
        self._stop = asyncio.Event()
        self.fatal = False
        self._lock_fd: int | None = None
        self._started = time.time()
        self.preempted = False
        self.metrics: MetricsServer | None = None
        if config.metrics_port is not None:
            self.metrics = MetricsServer(config.metrics_host, config.metrics_port,
                                         self.metrics_snapshot)  # fmt: skip

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; exit code 0 only if nothing was left un-uploaded."""
        gid = self.cfg.gid if self.cfg.group is not None else None
        self._lock_fd = recovery.prepare_root(self.cfg.root, gid=gid)
        if self.metrics is not None:  # before any store session: a port in use is a clean refusal
            await self.metrics.start()
        if self.cfg.store and self.cfg.check_store and not self.stores.is_root(self.cfg.store):
            try:
                await self.stores.get(self.cfg.store).check_access()
            except BaseException:  # a clean refusal closes its HTTP sessions (no asyncio noise)
                await self.stores.close()
                raise
            await self.stores.probe(self.cfg.store)  # once, logged; the fallbacks follow it
        for owed in recovery.rescan(self.cfg.root):
            job = Job(run=owed.run, tag=owed.tag, step=owed.step, store=owed.store,
                      state=JobState.COMMITTED)  # fmt: skip
            job.committed_at = time.time()
            self.jobs.add(job)
            self.uploads.enqueue(job)
        self.net.listen()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        self._spawn(self.net.accept_loop(), critical=True)
        self._spawn(self.jobs.meter())
        for _ in range(self.cfg.uploads):
            self._spawn(self.uploads.worker(), critical=True)
        if self.cfg.preemption is not None:
            self._spawn(watch_preemption(self.cfg.preemption, self.on_preemption_notice))
        if (interval := sdnotify.watchdog_interval()) is not None:
            self._spawn(self._watchdog(interval))
        sdnotify.notify("READY=1", f"STATUS=serving {self.cfg.socket}")
        log.info("ckptd %s serving on %s, root %s, store %s", __version__, self.cfg.socket,
                 self.cfg.root, self.cfg.store or "(the root)")  # fmt: skip
        await self._stop.wait()
        return await self._shutdown()

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("stop requested: no new saves, finishing staged work, draining uploads")
            self._stop.set()

    async def _shutdown(self) -> int:
        self.jobs.closing = True
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
        if self.metrics is not None:
            await self.metrics.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.net.close_all()
        await self.stores.close()
        if self.fatal:
            log.error("exiting 1 after an internal failure; committed work resumes on restart")
            return 1
        if ok:
            log.info("drained: everything committed and uploaded; exiting 0")
            return 0
        for job in left:
            log.error("left behind: %s %s (%s)", job.key, job.state, job.error or "not finished")
        log.error("%d checkpoint(s) not uploaded at exit; they stay in %s and resume on restart",
                  len(left), self.cfg.root)  # fmt: skip
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

    # ---- requests --------------------------------------------------------------------------

    async def _dispatch(self, client: Client, msg: dict[str, Any], reader: FrameReader) -> None:
        try:
            await self._handle(client, msg, reader)
        except ConfigError as e:  # e.g. a bad name: answer it, keep the client
            self._refuse(client, msg, str(e))

    async def _handle(self, client: Client, msg: dict[str, Any], reader: FrameReader) -> None:
        try:
            req = parse_request(msg)
        except ProtocolError as e:
            if msg.get("op") in ("mirror", "commit"):  # answered, the client stays
                client.send(ErrorEvent(rid=_rid(msg), error=str(e)))
                return
            raise
        match req:
            case HelloRequest():
                client.pid = req.pid
                client.run = check_name(req.run, "run") if req.run else None
                if req.store:
                    self.stores.get(req.store)  # validates the URL now, not at the first upload
                client.store = req.store
                client.send(self._welcome(req.rid))
            case SlotRequest():
                accept_slot(client, req, reader)
            case SaveRequest():
                self._on_save(client, req)
            case StatusRequest():
                client.send(StatusReport(rid=req.rid, **self.status()))
            case DrainRequest():
                self._spawn(self._reply_drain(client, req.rid, req.timeout))
            case MirrorRequest():
                self._spawn(self._reply_mirror(client, msg, req.rid))
            case CommitRequest():
                self._spawn(self.sharded.reply_commit(client, req))
            case ByeRequest():
                raise ConnectionResetError("client said bye")

    def _refuse(self, client: Client, msg: dict[str, Any], error: str) -> None:
        """Tell the client why its message was refused, as the reply it waits for."""
        log.warning("client %d (pid %s): refused %r: %s", client.id, client.pid, msg.get("op"),
                    error)  # fmt: skip
        if msg.get("op") == "save" and isinstance(msg.get("id"), int):
            slot = msg.get("slot") if isinstance(msg.get("slot"), int) else None
            client.send(Released(id=msg["id"], slot=slot))
            client.send(Failed(id=msg["id"], error=error))
        else:
            client.send(ErrorEvent(rid=_rid(msg), error=error))

    def _welcome(self, rid: int | None) -> Welcome:
        return Welcome(
            rid=rid,
            version=__version__,
            root=self.cfg.root,
            store=self.cfg.store,
            pid=os.getpid(),
            preempted=self.preempted,
            features=["mirror", "parts"],
        )

    def _on_save(self, client: Client, req: SaveRequest) -> None:
        save = parse_save(client, req, self.cfg.store)
        job = save.job
        refusal = self.jobs.refusal(job)
        if refusal is None and job.part is None:
            refusal = self._claim_writer(client, job.run)
        if refusal is not None:
            save.close()
            self._spawn(self.jobs.fail(job, refusal, release_slot=save.slot))
            return
        self.jobs.add(job)
        self.uploads.admitted(job)  # numbered in arrival order, for --upload-every
        self._spawn(self.writes.write(save))

    def _claim_writer(self, client: Client, run: str) -> str | None:
        """One live writer per run: the first connection that saves whole checkpoints of a run
        holds it until it disconnects; another one is refused, naming the holder. (Ranks of a
        sharded save write parts of one run together and are not writers in this sense.)"""
        holder = self.net.clients.get(self._writers.get(run, -1))
        if holder is None or not holder.alive or holder is client:
            self._writers[run] = client.id
            return None
        return (
            f"run {run} already has a live writer on this node (pid {holder.pid}, host "
            f"{socket.gethostname()}); two trainers on one run would drop each other's saves. "
            "Stop the other one or use another run name"
        )

    def _on_drop(self, client: Client) -> None:
        for run in [r for r, cid in self._writers.items() if cid == client.id]:
            del self._writers[run]
        self.mirrors.release(client.id)  # flush what it wrote (even after a crash), stop watching

    async def _committed(self, job: Job) -> None:
        """The write stage committed ``job`` locally: upload it, or it is done."""
        if job.part is not None:
            await self.sharded.committed_part(job)
        elif self.stores.is_root(job.store):
            await self.jobs.finish(job)
            self.uploads.retain(job)
        else:
            await self.uploads.committed(job)  # queued, or local only (--upload-every)

    async def _reply_mirror(self, client: Client, msg: dict[str, Any], rid: int | None) -> None:
        try:
            reply = parse_event(await self.mirrors.handle(msg, client=client.id))
        except (CkptdError, OSError) as e:  # bad run/dir/action, or no inotify watch left
            reply = ErrorEvent(error=f"cannot mirror: {e}")
        reply.rid = rid
        client.send(reply)

    async def on_preemption_notice(self, source: str, detail: str) -> None:
        """The machine is going away: tell clients, upload newest first, drop superseded uploads."""
        if self.preempted:
            return
        self.preempted = self.uploads.preempted = True
        log.warning("preemption notice from %s: %s; newest checkpoints first", source, detail)
        sdnotify.notify(f"STATUS=preempted ({source}); draining newest first")
        self.uploads.drop_superseded()
        await self.uploads.owe_newest()
        for client in list(self.net.clients.values()):
            client.send(Preempted(source=source, detail=detail))
        await self.jobs.changed()

    # ---- status and drain ------------------------------------------------------------------

    async def drain(self, timeout: float | None) -> tuple[bool, list[Job]]:
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        with self.uploads.draining():  # the newest checkpoint of each run is uploaded
            await self.uploads.owe_newest()
            await self.jobs.settle(deadline)
        left_s = None if deadline is None else max(0.0, deadline - time.monotonic())
        mirrored = await self.mirrors.flush_all(left_s)
        left_jobs = self.jobs.unfinished()
        return not left_jobs and mirrored, left_jobs

    async def _reply_drain(self, client: Client, rid: int | None, timeout: float | None) -> None:
        ok, left = await self.drain(timeout)
        client.send(Drained(rid=rid, ok=ok, pending=[j.as_dict() for j in left]))

    def status(self) -> dict[str, Any]:
        """The ``status`` reply (``StatusReport``; every field is in docs/status.md)."""
        jobs, summary = self.jobs.view()
        return {
            "pid": os.getpid(),
            "version": __version__,
            "root": self.cfg.root,
            "socket": self.cfg.socket,
            "store": self.cfg.store,
            "uptime": time.time() - self._started,
            "clients": self._training_clients(),
            "connections": len(self.net.clients),
            "closing": self.jobs.closing,
            "preempted": self.preempted,
            "counts": self.jobs.counts(),
            "upload_queue": len(self.uploads.queue),
            "bytes_written": self.stats.bytes_written,
            "bytes_uploaded": self.stats.bytes_uploaded,
            "bytes_deduped": self.stats.bytes_deduped,
            "store_retries": self.stores.retries(),
            "store_capabilities": self.stores.capabilities(),
            "mirrors": self.mirrors.pending(),
            "jobs": jobs,
            "summary": summary,
            "saves": self.stats.saves,
            "failures": self.stats.failures,
            "metrics": f"http://{self.metrics.host}:{self.metrics.port}/metrics"
            if self.metrics is not None
            else None,
        }

    def _training_clients(self) -> int:
        """Connections that said which run they save, or hold arena slots: training processes,
        not ``ckptd status`` or ``drain`` asking."""
        return sum(1 for c in self.net.clients.values() if c.alive and (c.run or c.slots))

    def metrics_snapshot(self) -> Snapshot:
        return Snapshot(
            version=__version__,
            started=self._started,
            stats=self.stats,
            jobs=self.jobs.values(),
            upload_queue=len(self.uploads.queue),
            clients=self._training_clients(),
            store_retries=self.stores.retries(),
            upload_retries=self.jobs.upload_retries(),
            preempted=self.preempted,
        )


def _rid(msg: dict[str, Any]) -> int | None:
    rid = msg.get("rid")
    return rid if isinstance(rid, int) and not isinstance(rid, bool) else None
