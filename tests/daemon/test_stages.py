"""The daemon's stages in-process, on the in-memory store with a fault-injecting wrapper.

No daemon process and no socket: the job table, the write stage and the upload stage are built
the way ``server.py`` wires them, with a fake client that records the events it is sent.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from ckptd.daemon.commit import StagedFile
from ckptd.daemon.config import DaemonConfig
from ckptd.daemon.jobs import Job, JobState, JobTable, Stats
from ckptd.daemon.lease import SlotLease
from ckptd.daemon.stores import StoreSet
from ckptd.daemon.uploads import UploadStage
from ckptd.daemon.write import StagedSave, WriteStage
from ckptd.errors import PermanentStorageError, TransientStorageError
from ckptd.header import encode_header
from ckptd.storage import Store, open_store
from ckptd.storage.memory import MemoryStore


class FakeClient:
    def __init__(self, cid: int = 1) -> None:
        self.id = cid
        self.alive = True
        self.events: list[dict[str, Any]] = []

    def send(self, msg: dict[str, Any]) -> None:
        self.events.append(msg.to_wire())

    def evs(self) -> list[str]:
        return [e["ev"] for e in self.events]


class FaultyStore(MemoryStore):
    """A memory store whose put_file fails as told: ``fail[key] = [exc, exc, ...]``, in order."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.fail: dict[str, list[BaseException]] = {}
        self.puts: list[str] = []
        self.in_flight: set[str] = set()
        self.overlaps = 0

    async def put_file(self, key: str, path: str, **kw: Any) -> None:  # type: ignore[override]
        if key in self.in_flight:
            self.overlaps += 1
        self.in_flight.add(key)
        try:
            self.puts.append(key)
            errors = self.fail.get(key.rsplit("/", 1)[-1])
            if errors:
                raise errors.pop(0)
            await asyncio.sleep(0)
            await super().put_file(key, path, **kw)
        finally:
            self.in_flight.discard(key)


@pytest.fixture
def memstore() -> Iterator[str]:
    MemoryStore.clear("stages")
    yield "memory://stages"
    MemoryStore.clear("stages")


def _stages(root: str, store: str | None, faulty: FaultyStore | None = None):  # type: ignore[no-untyped-def]
    cfg = DaemonConfig(root=root, socket=os.path.join(root, "s.sock"), store=store)
    clients: dict[int, Any] = {}
    jobs = JobTable(clients)

    def opener(url: str) -> Store:
        if faulty is not None and url == faulty.url:
            return faulty
        return open_store(url)

    stores = StoreSet(cfg.root, opener)
    stats = Stats()
    tasks: set[asyncio.Task[Any]] = set()

    def spawn(coro: Any) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro)
        tasks.add(t)
        return t

    async def never_orphan(job: Job) -> bool:
        return False

    async def part_upload(job: Job, progress: Any) -> None:
        raise AssertionError("no parts here")

    uploads = UploadStage(cfg, jobs, stores, stats, spawn=spawn, upload_part=part_upload,
                          orphaned=never_orphan)  # fmt: skip

    async def committed(job: Job) -> None:
        if stores.is_root(job.store):
            await jobs.finish(job)
        else:
            uploads.enqueue(job)

    writes = WriteStage(cfg, jobs, stores, stats, committed=committed, orphaned=never_orphan)
    return cfg, clients, jobs, writes, uploads, tasks


def _save(client: FakeClient, fd: int, size: int, tag: str, store: str | None) -> StagedSave:
    header = encode_header({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}})
    job = Job(run="r", tag=tag, step=int(tag[-1]), store=store, client=client.id, save_id=7)
    job.bytes_total = len(header) + size
    files = [StagedFile("model.weights.safetensors", header, 0, size)]
    return StagedSave(job, files, {"extra.msgpack": b"\x80"}, SlotLease(fd, size), 0, {})


def _memfd(size: int) -> int:
    fd = os.memfd_create("slot")
    os.write(fd, os.urandom(size))
    return fd


async def test_write_stage_commits_releases_and_closes_its_lease(tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, clients, jobs, writes, _, _ = _stages(str(tmp_path), None)
    client = clients[1] = FakeClient()
    fd = _memfd(4096)
    before = len(os.listdir("/proc/self/fd"))
    save = _save(client, fd, 4096, "t1", None)  # the lease holds a dup of the slot's fd
    jobs.add(save.job)
    await writes.write(save)
    assert len(os.listdir("/proc/self/fd")) == before  # the lease's dup is closed
    assert client.evs() == ["released", "committed", "uploaded"]
    manifest = json.loads((tmp_path / "r" / "checkpoints" / "t1" / "MANIFEST.json").read_text())
    assert set(manifest["files"]) == {"model.weights.safetensors", "extra.msgpack"}
    assert (tmp_path / "r" / "latest").read_text().strip() == "t1"
    os.close(fd)


async def test_a_second_write_of_a_tag_fails_and_keeps_the_first(tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, clients, jobs, writes, _, _ = _stages(str(tmp_path), None)
    client = clients[1] = FakeClient()
    fd = _memfd(4096)
    for _ in range(2):
        save = _save(client, fd, 4096, "t1", None)
        jobs.add(save.job)
        await writes.write(save)
    os.close(fd)
    assert client.evs() == ["released", "committed", "uploaded", "released", "failed"]
    assert "already exists" in client.events[-1]["error"]
    assert (tmp_path / "r" / "checkpoints" / "t1" / "MANIFEST.json").exists()


async def test_a_tag_that_exists_in_the_store_is_refused_before_commit(tmp_path, memstore) -> None:  # type: ignore[no-untyped-def]
    """A rerun on a fresh machine: the store has the tag, this root does not."""
    await open_store(memstore).put_bytes("r/checkpoints/t1/MANIFEST.json", b"{}")
    _, clients, jobs, writes, uploads, _ = _stages(str(tmp_path), memstore)
    client = clients[1] = FakeClient()
    fd = _memfd(4096)
    save = _save(client, fd, 4096, "t1", memstore)
    jobs.add(save.job)
    await writes.write(save)
    os.close(fd)
    assert client.evs() == ["released", "failed"] and "already exists" in client.events[-1]["error"]
    assert not (tmp_path / "r" / "checkpoints" / "t1").exists()
    assert not uploads.queue


async def test_job_table_refuses_a_tag_in_progress_and_when_closing() -> None:
    jobs = JobTable({})
    job = Job(run="r", tag="t", step=1, store=None)
    jobs.add(job)
    assert "already being saved" in (jobs.refusal(Job(run="r", tag="t", step=1, store=None)) or "")
    part = Job(run="r", tag="t", step=1, store=None, part="shard-0-of-2.safetensors")
    assert jobs.refusal(part) is not None  # a whole save in progress blocks its parts too
    await jobs.finish(job)
    assert jobs.refusal(Job(run="r", tag="t", step=1, store=None)) is None
    jobs.closing = True
    assert "shutting down" in (jobs.refusal(Job(run="r", tag="u", step=2, store=None)) or "")


async def _committed_local(tmp_path, clients, jobs, writes, store: str, tag: str):  # type: ignore[no-untyped-def]
    client = clients.setdefault(1, FakeClient())
    fd = _memfd(4096)
    save = _save(client, fd, 4096, tag, store)
    jobs.add(save.job)
    await writes.write(save)
    os.close(fd)
    return save.job


async def test_a_transient_upload_failure_is_retried_by_the_queue_once_per_attempt(  # type: ignore[no-untyped-def]
    tmp_path, memstore, monkeypatch
) -> None:
    import ckptd.daemon.uploads as uploads_mod

    monkeypatch.setattr(uploads_mod, "MAX_BACKOFF", 0.01)
    faulty = FaultyStore(memstore)
    faulty.fail["model.weights.safetensors"] = [TransientStorageError("503")] * 2
    _, clients, jobs, writes, uploads, tasks = _stages(str(tmp_path), memstore, faulty)
    job = await _committed_local(tmp_path, clients, jobs, writes, memstore, "t1")
    worker = asyncio.ensure_future(uploads.worker())
    try:
        await asyncio.wait_for(jobs.settle(None), 30)
    finally:
        worker.cancel()
        for t in tasks:
            t.cancel()
    assert job.state == JobState.UPLOADED and job.retries == 2
    weights = [k for k in faulty.puts if k.endswith("model.weights.safetensors")]
    assert len(weights) == 3  # one try per queue attempt: no retry layer on top of the store's
    assert faulty.overlaps == 0
    assert await faulty.get_bytes("r/latest") == b"t1\n"


async def test_a_permanent_failure_is_told_once_kept_owed_and_cancels_its_siblings(  # type: ignore[no-untyped-def]
    tmp_path, memstore
) -> None:
    # Issue 17: a store that said no is re-checked slowly while the daemon lives (a bucket can
    # come back), not failed for good; the saver hears of it at once, and settle (drain) does
    # not wait for the slow re-check.
    faulty = FaultyStore(memstore)
    faulty.fail["model.weights.safetensors"] = [PermanentStorageError("403 denied")]
    _, clients, jobs, writes, uploads, tasks = _stages(str(tmp_path), memstore, faulty)
    job = await _committed_local(tmp_path, clients, jobs, writes, memstore, "t1")
    worker = asyncio.ensure_future(uploads.worker())
    try:
        await asyncio.wait_for(jobs.settle(None), 30)
    finally:
        worker.cancel()
        for t in tasks:
            t.cancel()
    assert job.state == JobState.COMMITTED and "403" in (job.error or "")
    assert job.reason == "server refused" and job.retry_at is not None and job.attempts == 1
    assert clients[1].evs()[-1] == "failed"
    assert not await faulty.list("r/checkpoints/t1/MANIFEST.json")  # never committed remotely
    assert (tmp_path / "r" / "checkpoints" / "t1" / "MANIFEST.json").exists()  # local copy kept


async def test_the_queue_shares_between_runs_and_goes_newest_first_under_preemption(
    tmp_path,
) -> None:  # type: ignore[no-untyped-def]
    _, _, jobs, _, uploads, _ = _stages(str(tmp_path), "memory://x")
    made = []
    for run, step in (("a", 1), ("a", 2), ("b", 1)):
        j = Job(run=run, tag=f"s{step}", step=step, store="memory://x", state=JobState.COMMITTED)
        j.committed_at = 1.0
        jobs.add(j)
        uploads.enqueue(j)
        made.append(j)
    first = uploads._next()
    second = uploads._next()
    assert first is not None and second is not None and {first.run, second.run} == {"a", "b"}
    uploads.enqueue(first)
    uploads.enqueue(second)
    uploads.preempted = True
    chosen = uploads._next()
    assert chosen is not None and (chosen.run, chosen.step) in (("a", 2), ("b", 1))
    assert made[0].state == JobState.DROPPED  # a@1 is superseded by a@2


async def test_records_go_through_the_upload_queue_and_errors_reach_the_mirror(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The mirror's uploads share the queue (its bound, fair share and preemption order)."""
    _, _, _, _, uploads, tasks = _stages(str(tmp_path), "memory://x")
    ran: list[str] = []

    async def ok() -> None:
        ran.append("ok")

    async def bad() -> None:
        raise TransientStorageError("503")

    waiting = asyncio.ensure_future(uploads.transfer("r", ok))
    await asyncio.sleep(0)
    assert not ran and len(uploads.queue) == 1  # nothing runs outside a worker
    worker = asyncio.ensure_future(uploads.worker())
    try:
        await asyncio.wait_for(waiting, 10)
        assert ran == ["ok"]
        with pytest.raises(TransientStorageError):
            await asyncio.wait_for(uploads.transfer("r", bad), 10)
    finally:
        worker.cancel()
        for t in tasks:
            t.cancel()


async def test_a_failed_file_cancels_its_siblings_before_anything_is_retried(
    tmp_path, memstore
) -> None:  # type: ignore[no-untyped-def]
    """Before: asyncio.gather let the siblings of a failed file keep uploading while the retry
    started the same keys again, both writing one journal."""
    from ckptd.daemon.upload import upload_checkpoint

    class Hanging(FaultyStore):
        cancelled: list[str] = []

        async def put_file(self, key: str, path: str, **kw: Any) -> None:  # type: ignore[override]
            if key.endswith("extra.msgpack"):
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    self.cancelled.append(key)
                    raise
            await super().put_file(key, path, **kw)

    store = Hanging(memstore)
    store.fail["model.weights.safetensors"] = [PermanentStorageError("403")]
    _, clients, jobs, writes, _, _ = _stages(str(tmp_path), memstore)
    await _committed_local(tmp_path, clients, jobs, writes, memstore, "t1")

    async def once(fn: Any, *, what: str) -> Any:
        return await fn()

    with pytest.raises(PermanentStorageError):
        await asyncio.wait_for(
            upload_checkpoint(
                store,
                str(tmp_path),
                "r",
                "t1",
                file_concurrency=4,
                progress=lambda n: None,
                with_retries=once,
            ),
            10,
        )
    assert store.cancelled == ["r/checkpoints/t1/extra.msgpack"]
    assert not await store.list("r/checkpoints/t1/MANIFEST.json")


async def test_a_committed_file_that_no_longer_matches_fails_once_not_forever(
    tmp_path, memstore
) -> None:  # type: ignore[no-untyped-def]
    """Before: a CRC mismatch of a committed file was retried forever and drain never ended."""
    _, clients, jobs, writes, uploads, _ = _stages(str(tmp_path), memstore)
    job = await _committed_local(tmp_path, clients, jobs, writes, memstore, "t1")
    path = tmp_path / "r" / "checkpoints" / "t1" / "model.weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    worker = asyncio.ensure_future(uploads.worker())
    try:
        await asyncio.wait_for(jobs.settle(None), 30)
    finally:
        worker.cancel()
    assert job.state == JobState.FAILED and job.retries == 0
    assert "changed" in (job.error or "") or "crc" in (job.error or "").lower()
