"""Why a checkpoint is not in its store: typed reasons, sentences in human units, logs that do not
flood, and a store that said no (a missing bucket) re-checked instead of failed for good.

The integration tests run a real daemon against the real moto S3 server; faults are injected
between real parts (the fault proxy refuses connections; the bucket is really deleted).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from ckptd import Checkpointer
from ckptd.daemon.logthrottle import Throttle, suppressed_note
from ckptd.daemon.reasons import PERMANENT, Reason, classify, explain, note, one_line
from ckptd.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    BucketMissingError,
    CredentialsError,
    IntegrityError,
    PermanentStorageError,
    StoreUnreachableError,
    TransientStorageError,
)
from ckptd.progress import human_bytes
from ckptd.storage.memory import MemoryStore
from ckptd.storage.s3 import S3Store
from ckptd.testing.servers import free_port
from tests.helpers import Net, until

# ---- reasons, by type --------------------------------------------------------------------------


def _from(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (StoreUnreachableError("x"), Reason.UNREACHABLE),
        (TransientStorageError("503"), Reason.UNAVAILABLE),
        (BucketMissingError("x"), Reason.BUCKET_MISSING),
        (AccessDeniedError("403"), Reason.ACCESS_DENIED),
        (CredentialsError("none"), Reason.ACCESS_DENIED),
        (PermissionError(errno.EACCES, "denied"), Reason.ACCESS_DENIED),
        (PermanentStorageError("400"), Reason.REFUSED),
        (IntegrityError("crc"), Reason.REFUSED),
        (AlreadyExistsError("tag"), Reason.REFUSED),
        (OSError(errno.ENOSPC, "No space left on device"), Reason.DISK_FULL),
        (_from(TransientStorageError("w"), OSError(errno.ENOSPC, "full")), Reason.DISK_FULL),
        (ValueError("?"), Reason.UNKNOWN),
    ],
)
def test_reason_is_decided_by_type(exc: BaseException, reason: Reason) -> None:
    assert classify(exc) == reason


def test_the_tree_keeps_its_parents() -> None:
    # Code that catches the old classes keeps working: the new ones are refinements.
    assert issubclass(BucketMissingError, PermanentStorageError)
    assert issubclass(CredentialsError, AccessDeniedError)
    assert issubclass(AccessDeniedError, PermanentStorageError)
    assert issubclass(StoreUnreachableError, TransientStorageError)
    assert Reason.BUCKET_MISSING in PERMANENT and Reason.UNREACHABLE not in PERMANENT


async def _s3_error(store: S3Store) -> BaseException:  # any store: the first error of a put
    try:
        await store.put_bytes("k", b"x")
    except Exception as e:  # noqa: BLE001 - the test looks at the type
        return e
    finally:
        await store.close()
    raise AssertionError("no error")


def test_s3_translates_missing_bucket_and_dead_endpoint(
    s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.servers import set_s3_env

    set_s3_env(monkeypatch, s3_server)
    e = asyncio.run(_s3_error(S3Store("no-such-bucket-here")))
    assert isinstance(e, BucketMissingError), repr(e)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    e = asyncio.run(_s3_error(S3Store("b", retry_attempts=1)))
    assert isinstance(e, StoreUnreachableError), repr(e)


def test_gcs_translates_a_missing_bucket_on_upload(
    gcs_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptd.storage.gcs import GCSStore

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server)
    e = asyncio.run(_s3_error(GCSStore("no-such-bucket-here")))  # type: ignore[arg-type]
    assert isinstance(e, BucketMissingError), repr(e)


class _Job:
    reason: str | None = None
    reason_since: float | None = None
    attempts: int = 0
    error: str | None = None


def test_note_keeps_since_while_the_reason_stays() -> None:
    job = _Job()
    assert note(job, StoreUnreachableError("a"), "first\nline", now=100.0)
    assert not note(job, StoreUnreachableError("b"), "again", now=130.0)
    assert (job.reason, job.reason_since, job.attempts, job.error) == (
        "store unreachable", 100.0, 2, "again"
    )  # fmt: skip
    assert note(job, BucketMissingError("c"), "gone", now=140.0)  # a new reason: a new streak
    assert (job.reason, job.reason_since, job.attempts) == ("bucket missing", 140.0, 1)
    assert one_line("a\n  b\tc") == "a b c" and len(one_line("x" * 5000)) <= 240


def test_explain_says_why_in_human_units() -> None:
    since = time.mktime((2026, 1, 2, 12, 3, 41, 0, 0, -1))
    jobs: list[dict[str, Any]] = [
        {"run": "r", "tag": f"t{i}", "state": "committed", "store": "s3://b/p",
         "reason": "store unreachable", "reason_since": since + i, "attempts": 2,
         "bytes_total": 600 << 20, "bytes_uploaded": 50 << 20, "error": "upload: refused"}
        for i in range(2)
    ]  # fmt: skip
    jobs.append({"run": "r", "tag": "t9", "state": "uploading", "store": "s3://b/p",
                 "bytes_total": 1 << 20, "bytes_uploaded": 0})  # fmt: skip
    lines = explain(jobs, now=since + 25)
    assert lines[0] == (
        "2 checkpoints not in s3://b/p: store unreachable since 12:03:41 (25s), 4 attempts, "
        "1.1 GiB to go; last error: upload: refused"
    )
    assert lines[1] == "1 checkpoint not in s3://b/p: uploading, 1.0 MiB to go"


def test_throttle_one_line_per_key_per_interval() -> None:
    now = [0.0]
    t = Throttle(30.0, clock=lambda: now[0])
    assert t.allow("a") == 0
    for _ in range(5):
        now[0] += 1
        assert t.allow("a") is None  # held back and counted
    assert t.allow("b") == 0  # another key has its own budget
    now[0] = 31.0
    assert t.allow("a") == 5  # the next line says how many were held back
    assert t.allow("a") is None
    assert t.forget("a") == 1 and t.allow("a") == 0
    assert suppressed_note(5, 30) == " (5 more like this in the last 30 s)"
    assert suppressed_note(0, 30) == ""
    small = Throttle(1.0, clock=lambda: now[0], max_keys=2)
    for k in "xyz":
        small.allow(k)
    assert small.allow("x") == 0  # forgotten (bounded memory), so allowed again


# ---- the daemon with the real S3 server ------------------------------------------------------------


def _ckptd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "CKPTD_PROGRESS": "0"},
    )


def _job(sock: str, key: str) -> dict[str, Any] | None:
    out = _ckptd("status", "--json", "--socket", sock)
    assert out.returncode == 0, out.stderr
    return next(
        (j for j in json.loads(out.stdout)["jobs"] if f"{j['run']}@{j['tag']}" == key), None
    )


def _size(root: str, run: str, tag: str) -> int:
    with open(os.path.join(root, run, "checkpoints", tag, "MANIFEST.json")) as f:
        return sum(int(r["size"]) for r in json.load(f)["files"].values())


@pytest.mark.slow
def test_store_down_says_why_logs_little_and_uploads_when_back(
    s3_proxy,
    s3_bucket,
    make_daemon,  # type: ignore[no-untyped-def]
) -> None:
    store = f"s3://{s3_bucket}/why"
    d = make_daemon(store=store, args=["--no-check-store"])
    s3_proxy.down()
    key = "down@step-00000001"
    with Checkpointer("down", socket=d.socket) as ckpt:
        ckpt.save(1, model=Net(width=512)).wait("committed", timeout=60)
    # The job says why, since when and how often; status --json carries the fields.
    until(
        lambda: ((_job(d.socket, key) or {}).get("attempts") or 0) >= 2, 90, "two failed attempts"
    )
    job = _job(d.socket, key)
    assert job is not None and job["reason"] == "store unreachable" and job["reason_since"]
    out = _ckptd("drain", "--timeout", "1", "--socket", d.socket)
    assert out.returncode == 1
    assert f"1 checkpoint not in {store}: store unreachable since " in out.stderr, out.stderr
    assert "to go" in out.stderr and "Unclosed" not in out.stderr
    # Rate-limited: one failure line for this checkpoint within the interval, however many
    # attempts (each of them many requests) failed; the store layer's retries are not logged.
    log = d.log_text()
    failure_lines = [ln for ln in log.splitlines() if f"{key} not in {store}" in ln]
    assert len(failure_lines) == 1, failure_lines
    rest = [ln for ln in log.splitlines() if f"{key} not in" not in ln]
    assert not [ln for ln in rest if "attempt" in ln], rest  # no per-request retry lines
    assert len(log.splitlines()) < 25, log
    # Killed while down; back up: the restarted daemon uploads it and logs its real size.
    d.kill()
    s3_proxy.up()
    d.start()
    out = _ckptd("drain", "--timeout", "90", "--socket", d.socket)
    assert out.returncode == 0, out.stderr
    size = _size(d.root, "down", "step-00000001")
    assert size > 1 << 20
    assert f"uploaded {key} to {store}: {human_bytes(size)} (" in d.log_text(), d.log_text()


@pytest.mark.slow
def test_bucket_deleted_then_recreated_is_used_again(s3_bucket, s3_server, make_daemon) -> None:  # type: ignore[no-untyped-def]
    store = f"s3://{s3_bucket}/gone"
    d = make_daemon(store=store)  # the start-up probe sees the bucket
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.delete_bucket(Bucket=s3_bucket)
    key = "gone@step-00000001"
    with Checkpointer("gone", socket=d.socket) as ckpt:
        ckpt.save(1, model=Net()).wait("committed", timeout=60)
    until(lambda: (_job(d.socket, key) or {}).get("reason") == "bucket missing", 60, "the reason")
    job = _job(d.socket, key)
    assert job is not None and job["state"] != "failed"  # not failed for good: re-checked
    # A drain does not wait for a store that said no: it says why and what works now.
    t = time.monotonic()
    out = _ckptd("drain", "--timeout", "60", "--socket", d.socket)
    assert out.returncode == 1 and time.monotonic() - t < 30
    assert f"not in {store}: bucket missing since" in out.stderr, out.stderr
    assert f"ckptd abandon --socket {d.socket} {key}" in out.stderr
    assert f"ckptd drain --socket {d.socket}" in out.stderr
    # Recreated: the next drain re-checks at once (no waiting out the 30 s..5 min backoff).
    s3.create_bucket(Bucket=s3_bucket)
    t = time.monotonic()

    def drained() -> bool:
        return _ckptd("drain", "--timeout", "20", "--socket", d.socket).returncode == 0

    until(drained, 60, "the upload after the bucket came back")
    assert time.monotonic() - t < 25  # well before the slow re-check (30 s, then 60 s ...)
    assert _ckptd("ls", f"{store}/gone").stdout.count("step-00000001") == 1
    s3.close()


def test_gc_dry_run_says_would(daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with Checkpointer("g", socket=daemon.socket) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, model=Net()).wait(timeout=30)
    url = f"{daemon.root}/g"
    out = _ckptd("gc", url, "--keep-last", "1", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "would delete 2 checkpoint(s)" in out.stdout and "deleted" not in out.stdout
    assert len(os.listdir(os.path.join(url, "checkpoints"))) == 3  # nothing deleted


def test_typoed_bucket_is_a_clean_refusal(s3_bucket, short_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = _ckptd(
        "serve", "--root", str(tmp_path / "root"), "--socket", os.path.join(short_dir, "t.sock"),
        "--store", f"s3://{s3_bucket}-typo/p",
    )  # fmt: skip
    assert out.returncode == 1
    assert "does not exist" in out.stderr
    assert "Unclosed" not in out.stderr and "Traceback" not in out.stderr, out.stderr


# ---- the upload stage alone (memory store): the slow re-check and abandoning in flight -----------


@pytest.fixture
def memstore() -> Iterator[str]:
    MemoryStore.clear("why")
    yield "memory://why"
    MemoryStore.clear("why")


async def test_a_missing_bucket_is_rechecked_slowly_until_it_is_back(  # type: ignore[no-untyped-def]
    tmp_path,
    memstore,
    monkeypatch,
) -> None:
    import ckptd.daemon.uploads as uploads_mod
    from ckptd.daemon.jobs import JobState
    from tests.daemon.test_stages import FaultyStore, _committed_local, _stages

    monkeypatch.setattr(uploads_mod, "PERMANENT_BACKOFF", 0.2)  # 30 s in production
    faulty = FaultyStore(memstore)
    gone = BucketMissingError("no bucket")
    faulty.fail["model.weights.safetensors"] = [gone, gone]  # then the bucket is back
    _, clients, jobs, writes, uploads, tasks = _stages(str(tmp_path), memstore, faulty)
    job = await _committed_local(tmp_path, clients, jobs, writes, memstore, "t1")
    worker = asyncio.ensure_future(uploads.worker())
    try:
        deadline = time.monotonic() + 30
        while job.state != JobState.UPLOADED:  # no drain: the daemon's own re-check does it
            assert time.monotonic() < deadline, (job.state, job.reason, job.attempts)
            await asyncio.sleep(0.05)
    finally:
        worker.cancel()
        for t in tasks:
            t.cancel()
    assert job.retries == 2 and job.reason is None and job.error is None
    assert uploads_mod.PERMANENT_MAX_BACKOFF == 300.0


async def test_abandon_cancels_an_upload_in_flight(  # type: ignore[no-untyped-def]
    tmp_path,
    memstore,
) -> None:
    from ckptd.daemon.abandon import abandon
    from ckptd.daemon.jobs import JobState
    from tests.daemon.test_stages import FaultyStore, _committed_local, _stages

    started = asyncio.Event()

    class Hanging(FaultyStore):
        async def put_file(self, key: str, path: str, **kw: Any) -> None:  # type: ignore[override]
            started.set()
            await asyncio.Event().wait()  # a store that never answers

    store = Hanging(memstore)
    _, clients, jobs, writes, uploads, tasks = _stages(str(tmp_path), memstore, store)
    job = await _committed_local(tmp_path, clients, jobs, writes, memstore, "t1")
    worker = asyncio.ensure_future(uploads.worker())
    try:
        await asyncio.wait_for(started.wait(), 10)
        assert abandon(str(tmp_path), "r", "t1", by="test") == [("r", "t1", memstore)]
        await asyncio.wait_for(jobs.settle(None), 10)  # the drain stops waiting
        await asyncio.sleep(0.05)
        assert not worker.done()  # only the upload was cancelled, not the worker that ran it
    finally:
        worker.cancel()
        for t in tasks:
            t.cancel()
    assert job.state == JobState.DROPPED and job.reason == "abandoned"
    assert clients[1].evs()[-1] == "failed"
    assert (tmp_path / "r" / "checkpoints" / "t1" / "MANIFEST.json").exists()  # the copy stays
