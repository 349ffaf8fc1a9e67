"""Upload and disk policy with the real daemon and the real S3 server (moto): upload every K-th
checkpoint (the newest always at drain, SIGTERM and on a preemption notice), the shared upload
bandwidth limit, and the local retention default once uploads are verified."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest
import torch

import ckptd
from ckptd import Checkpointer
from ckptd.cli import build_parser
from tests.helpers import until
from tests.test_preempt_daemon import _Served


def _steps(url: str) -> list[int]:
    return sorted(int(m["step"]) for m in ckptd.list_checkpoints(url))


def _states(ckpt: Checkpointer, run: str) -> dict[int, str]:
    return {j["step"]: j["state"] for j in ckpt.status()["jobs"] if j["run"] == run}


def _count(ckpt: Checkpointer, state: str) -> int:
    return int(ckpt.status()["counts"].get(state, 0))


def _local_tags(root: str, run: str) -> list[str]:
    ck = os.path.join(root, run, "checkpoints")
    return sorted(t for t in os.listdir(ck) if os.path.exists(os.path.join(ck, t, "MANIFEST.json")))


def _owed(root: str, run: str) -> list[str]:
    d = os.path.join(root, ".ckptd", "uploads", run.replace("/", "~"))
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def _drain(sock: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptd", "drain", "--socket", sock, "--timeout", str(timeout)],
        capture_output=True, text=True, timeout=timeout + 30,
    )  # fmt: skip


def test_every_third_is_uploaded_and_the_newest_at_drain(s3_bucket, make_daemon) -> None:  # type: ignore[no-untyped-def]
    store = f"s3://{s3_bucket}/k3"
    d = make_daemon(store=store, args=["--upload-every", "3", "--keep-local", "all"])
    model = torch.nn.Linear(32, 32)
    with Checkpointer("every", socket=d.socket) as ckpt:
        handles = [ckpt.save(s, model=model) for s in range(1, 8)]
        for h in handles:
            h.wait("committed", timeout=60)
        handles[2].wait("uploaded", timeout=60)
        handles[5].wait("uploaded", timeout=60)
        until(lambda: _count(ckpt, "local-only") == 5, 30, "five checkpoints kept local only")
        assert _steps(f"{store}/every") == [3, 6]
        assert _owed(d.root, "every") == []  # local only: nothing owed, nothing pending
        listed = _states(ckpt, "every")  # status lists the last few finished ones
        assert listed.get(7) == "local-only" and listed.get(6) == "uploaded", listed
        drained = _drain(d.socket)
        assert drained.returncode == 0, drained.stdout + drained.stderr
        assert _steps(f"{store}/every") == [3, 6, 7]
        handles[6].wait("uploaded", timeout=10)  # its client hears it was uploaded after all
        assert _count(ckpt, "local-only") == 4 and _count(ckpt, "uploaded") == 3
        # the remote pointer names the newest; every checkpoint stays on the local disk
        assert ckptd.load(f"{store}/every")["meta"]["step"] == 7
        assert len(_local_tags(d.root, "every")) == 7


def test_sigterm_uploads_the_newest_even_if_it_is_not_a_kth(s3_bucket, make_daemon) -> None:  # type: ignore[no-untyped-def]
    store = f"s3://{s3_bucket}/term"
    d = make_daemon(store=store, args=["--upload-every", "3"])
    with Checkpointer("term", socket=d.socket) as ckpt:
        for h in [ckpt.save(s, model=torch.nn.Linear(8, 8)) for s in range(1, 5)]:
            h.wait("committed", timeout=60)
    assert d.stop() == 0, d.log_text()[-3000:]
    assert _steps(f"{store}/term") == [3, 4]


def test_a_preemption_notice_uploads_the_newest_local_only_one(s3_bucket, make_daemon) -> None:  # type: ignore[no-untyped-def]
    served = _Served()
    try:
        store = f"s3://{s3_bucket}/spot"
        d = make_daemon(
            store=store,
            args=["--upload-every", "5", "--preemption", "aws",
                  "--aws-metadata-url", served.md.url, "--preemption-poll", "0.1"],
        )  # fmt: skip
        with Checkpointer("spot", socket=d.socket) as ckpt:
            handles = [ckpt.save(s, model=torch.nn.Linear(8, 8)) for s in (1, 2)]
            for h in handles:
                h.wait("committed", timeout=60)
            until(lambda: _count(ckpt, "local-only") == 2, 30, "both kept local only")
            served.md.aws_notice = True
            handles[1].wait("uploaded", timeout=60)
            assert _count(ckpt, "local-only") == 1 and _states(ckpt, "spot")[1] == "local-only"
            # after the notice every new checkpoint is uploaded, K-th or not
            ckpt.save(3, model=torch.nn.Linear(8, 8)).wait("uploaded", timeout=60)
        assert _steps(f"{store}/spot") == [2, 3]
    finally:
        served.close()


def test_local_copies_are_trimmed_once_uploaded_but_never_an_owed_one(  # type: ignore[no-untyped-def]
    s3_bucket, make_daemon
) -> None:
    store = f"s3://{s3_bucket}/disk"
    d = make_daemon(store=store)  # the default: --keep-local 3
    bad = f"s3://no-such-bucket-{os.getpid()}/x"
    with Checkpointer("disk", store=bad, socket=d.socket) as ckpt:
        ckpt.save(1, model=torch.nn.Linear(8, 8)).wait("committed", timeout=60)
    with Checkpointer("disk", socket=d.socket) as ckpt:
        for s in range(2, 7):
            ckpt.save(s, model=torch.nn.Linear(8, 8)).wait("uploaded", timeout=60)
    want = ["step-00000001", "step-00000004", "step-00000005", "step-00000006"]
    until(lambda: _local_tags(d.root, "disk") == want, 30, f"local copies {want}")
    assert _owed(d.root, "disk") == ["step-00000001.json"]  # its upload is still owed: kept
    assert _steps(f"{store}/disk") == [2, 3, 4, 5, 6]  # the store keeps them all


def test_keep_local_all_keeps_every_copy(s3_bucket, make_daemon) -> None:  # type: ignore[no-untyped-def]
    store = f"s3://{s3_bucket}/all"
    d = make_daemon(store=store, args=["--keep-local", "all"])
    with Checkpointer("all", socket=d.socket) as ckpt:
        for s in range(1, 6):
            ckpt.save(s, model=torch.nn.Linear(8, 8)).wait("uploaded", timeout=60)
    assert d.stop() == 0
    assert len(_local_tags(d.root, "all")) == 5


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_the_upload_limit_holds_the_rate(scheme: str, request, make_daemon) -> None:  # type: ignore[no-untyped-def]
    bucket = request.getfixturevalue("s3_bucket" if scheme == "s3" else "gcs_bucket")
    store = f"{scheme}://{bucket}/slow"
    limit = 4 * 10**6  # 4 MB/s, bursts of one second's worth
    d = make_daemon(store=store, args=["--upload-limit", "4MB/s"])
    torch.manual_seed(0)
    model = torch.nn.Linear(1536, 1536)  # ~9.4 MB of weights: two 5+ MiB parts or one object
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    with Checkpointer("slow", socket=d.socket) as ckpt:
        h = ckpt.save(1, model=model, save_optim=False)
        h.wait("committed", timeout=60)
        start = time.monotonic()
        h.wait("uploaded", timeout=120)
        took = time.monotonic() - start
    # The first second's worth may go at once; the rest cannot be faster than the limit.
    assert took >= (size - limit) / limit * 0.95, (took, size)
    assert ckptd.load(f"{store}/slow")["meta"]["step"] == 1


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--upload-every", "0"], "upload_every"),
        (["--upload-limit", "fast"], "as a rate"),
        (["--keep-local", "some"], "keep-local"),
        (["--keep-local", "0"], "keep_last"),
    ],
)
def test_bad_policy_values_are_bad_usage(args: list[str], why: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = subprocess.run(
        [sys.executable, "-m", "ckptd", "serve", "--root", str(tmp_path / "r"),
         "--socket", str(tmp_path / "s.sock"), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert why in r.stderr


def test_keep_local_default_and_old_spelling() -> None:
    from ckptd.cli import keep_local_retention

    def parse(*argv: str) -> Any:
        return keep_local_retention(build_parser().parse_args(["serve", *argv]))

    assert parse().keep_last == 3
    assert parse("--keep-local", "all").active is False
    assert parse("--keep-local", "5").keep_last == 5
    assert parse("--local-keep-last", "2").keep_last == 2


def test_the_kth_decision_counts_saves_in_arrival_order(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """In-process: commits finish out of order, the count follows the order saves arrived; a
    drain owes the newest local-only one, and a commit during a drain is always uploaded."""
    import asyncio

    from ckptd.daemon.config import DaemonConfig
    from ckptd.daemon.jobs import Job, JobState, JobTable, Stats
    from ckptd.daemon.stores import StoreSet
    from ckptd.daemon.upload import pending_records
    from ckptd.daemon.uploads import UploadStage

    async def go() -> None:
        root = str(tmp_path)
        cfg = DaemonConfig(root=root, socket=os.path.join(root, "s.sock"), upload_every=3)
        jobs = JobTable({})

        async def no_part(job: Job, progress: Any) -> None:
            raise AssertionError("no parts here")

        async def never(job: Job) -> bool:
            return False

        uploads = UploadStage(cfg, jobs, StoreSet(root), Stats(), spawn=asyncio.ensure_future,
                              upload_part=no_part, orphaned=never)  # fmt: skip
        made = {}
        for step in range(1, 8):
            made[step] = Job(run="r", tag=f"s{step}", step=step, store="memory://policy")
            jobs.add(made[step])
            uploads.admitted(made[step])
        for step in (7, 2, 6, 1, 3, 5, 4):  # several writers: any commit order
            made[step].state, made[step].committed_at = JobState.COMMITTED, float(step)
            await uploads.committed(made[step])
        assert sorted(j.step for j in uploads.queue) == [3, 6]
        local = sorted(s for s, j in made.items() if j.state == JobState.LOCAL_ONLY)
        assert local == [1, 2, 4, 5, 7]
        with uploads.draining():
            assert [j.step for j in await uploads.owe_newest()] == [7]
            assert await uploads.owe_newest() == []  # owed once
            assert [(r, t) for r, t, _ in pending_records(root)] == [("r", "s7")]  # on disk
            extra = Job(run="r", tag="s8", step=8, store="memory://policy")
            jobs.add(extra)
            uploads.admitted(extra)  # the 8th: not a K-th, but a drain is running
            extra.committed_at = 8.0
            await uploads.committed(extra)
        assert sorted(j.step for j in uploads.queue) == [3, 6, 7, 8]
        for step in (9, 10):  # after the drain: the 9th save is a K-th one, the 10th is not
            made[step] = Job(run="r", tag=f"s{step}", step=step, store="memory://policy")
            jobs.add(made[step])
            uploads.admitted(made[step])
            made[step].committed_at = float(step)
            await uploads.committed(made[step])
        assert made[9].state == JobState.STAGED and made[9] in uploads.queue
        assert made[10].state == JobState.LOCAL_ONLY

    asyncio.run(go())
