"""The status screen (``ckptd.statusview``) from synthetic status replies, and the daemon side
that feeds it (``Job`` phases and rates, ``JobTable.view``'s summary); no daemon needed."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from ckptd.daemon.jobs import RATE_WINDOW, Job, JobState, JobTable, Phase
from ckptd.statusview import job_line, render

NOW = 1_800_000_000.0
MiB = 1 << 20


def _status(jobs: list[dict[str, Any]], **over: Any) -> dict[str, Any]:
    st = {
        "pid": 4242, "version": "0.1.0", "root": "/data/ckptd", "socket": "/run/ckptd.sock",
        "store": "s3://bucket/prefix", "uptime": 192.0, "clients": 2, "closing": False,
        "preempted": False, "counts": {}, "upload_queue": 1, "bytes_written": 3 * 2**30,
        "bytes_uploaded": 2 * 2**30, "store_retries": {"s3://bucket/prefix": 4}, "mirrors": {},
        "jobs": jobs, "summary": {"jobs": 0, "counts": {}, "bytes": 0, "since": None},
        "connections": 3, "saves": 12, "failures": 1, "metrics": None,
    }  # fmt: skip
    st.update(over)
    return st


def _job(tag: str, phase: str, **over: Any) -> dict[str, Any]:
    j = {
        "run": "exp/llm", "tag": tag, "part": None, "step": 1, "state": phase, "phase": phase,
        "store": "s3://bucket/prefix", "bytes_total": 576 * MiB, "bytes_written": 576 * MiB,
        "bytes_uploaded": 0, "bytes_done": 0, "rate": 0.0, "eta": None, "upload_rate": 0.0,
        "retries": 0, "retry_at": None, "error": None, "created": NOW - 300,
        "committed_at": NOW - 290, "upload_started": None, "uploaded_at": None,
    }  # fmt: skip
    j.update(over)
    return j


def _fits(lines: list[str], columns: int, rows: int) -> None:
    assert len(lines) <= rows, lines
    for line in lines:
        assert len(line) < columns and "\n" not in line and "\r" not in line, line


def test_header_active_finished_summary_in_order() -> None:
    jobs = [
        _job("step-00000100", "uploaded", uploaded_at=NOW - 60, upload_started=NOW - 100,
             upload_rate=14.4 * MiB, bytes_uploaded=576 * MiB),
        _job("step-00000200", "uploading", bytes_uploaded=200 * MiB, bytes_done=200 * MiB,
             rate=12.5 * MiB, eta=30.1, upload_started=NOW - 20),
        _job("step-00000300", "queued"),
    ]  # fmt: skip
    lines = render(_status(jobs, summary={"jobs": 195, "counts": {"uploaded": 190, "failed": 5},
                                          "bytes": 100 * 2**30, "since": NOW - 7200}),
                   100, 30, now=NOW)  # fmt: skip
    _fits(lines, 100, 30)
    assert lines[0].startswith("ckptd 0.1.0  pid 4242  up 3m12s  clients 2  upload queue 1")
    assert "store s3://bucket/prefix" in lines[1]
    assert "written 3.0 GiB" in lines[2] and "uploaded 2.0 GiB" in lines[2]
    up = next(x for x in lines if "step-00000200" in x)
    assert "uploading" in up and "200.0 MiB/576.0 MiB" in up and "12.5 MiB/s" in up
    assert "ETA 30s" in up and " 35%" in up
    queued = next(x for x in lines if "step-00000300" in x)
    assert "queued" in queued and "waiting for an upload worker" in queued
    assert "B/s" not in queued and "committed" not in queued.split("queued")[0]
    done = next(x for x in lines if "step-00000100" in x)
    assert "uploaded" in done and "in 40s (14.4 MiB/s), 1m00s ago" in done
    assert lines.index(up) < lines.index(done)  # work in progress first
    assert (
        lines[-1]
        == "earlier: 195 checkpoint(s) (5 failed, 190 uploaded), 100.0 GiB since 2h00m ago"
    )


def test_a_long_error_is_one_line_cut_to_the_width() -> None:
    error = "upload of exp/llm@step-00000007 interrupted:\n" + "store unreachable " * 40
    jobs = [_job("step-00000007", "committed", retries=7, error=error, retry_at=NOW + 12)]
    for columns in (120, 80, 40):
        lines = render(_status(jobs), columns, 30, now=NOW)
        _fits(lines, columns, 30)
        (line,) = [x for x in lines if "committed" in x]  # one line, however long the error
        assert "exp/llm" in line or "…" in line
    wide = render(_status(jobs), 200, 30, now=NOW)
    (line,) = [x for x in wide if "step-00000007" in x]
    assert "next upload try in 12s" in line and "retries 7" in line and "store unreachable" in line
    assert line.endswith("…")


def test_200_old_jobs_and_many_active_fit_a_30_row_pane() -> None:
    active = [_job(f"step-{i:08d}", "queued", committed_at=None) for i in range(60)]
    finished = [_job(f"done-{i:03d}", "uploaded", uploaded_at=NOW - i) for i in range(5)]
    st = _status(finished + active, summary={"jobs": 200, "counts": {"uploaded": 200},
                                              "bytes": 200 * 576 * MiB, "since": NOW - 86400})  # fmt: skip
    lines = render(st, 80, 30, now=NOW)
    _fits(lines, 80, 30)
    assert lines[0].startswith("ckptd 0.1.0  pid 4242")  # the header never scrolls away
    assert lines[-1].startswith("earlier: 200 checkpoint(s) (200 uploaded)")
    assert any(re.search(r"\.\.\. \d+ more in progress", x) for x in lines)
    assert "waiting for a writer" in lines[4]
    # Unlimited (a pipe): everything, nothing cut.
    full = render(st, None, None, now=NOW)
    assert len(full) == 3 + 1 + 60 + 1 + 5 + 1


@pytest.mark.parametrize(("columns", "rows"), [(40, 12), (24, 6), (10, 3)])
def test_narrow_and_short_terminals(columns: int, rows: int) -> None:
    jobs = [_job("step-00000001", "uploading", bytes_done=MiB, rate=MiB, eta=575.0)]
    lines = render(_status(jobs, preempted=True, closing=True), columns, rows, now=NOW)
    _fits(lines, columns, rows)
    assert lines[0].startswith("ckptd"[: columns - 2])


def test_finishing_writing_and_flags() -> None:
    jobs = [
        _job("step-00000001", "finishing", bytes_uploaded=576 * MiB, bytes_done=576 * MiB),
        _job("step-00000002", "writing", committed_at=None, bytes_done=100 * MiB, idle=12.0),
        _job("step-00000004", "uploading", bytes_done=13, rate=0.0, idle=1.0, eta=9e9),
        _job("step-00000003", "failed", error="access denied"),
    ]
    lines = render(_status(jobs, preempted=True), 120, 30, now=NOW)
    assert "PREEMPTED" in lines[0] and "CLOSING" not in lines[0]
    fin = next(x for x in lines if "step-00000001" in x)
    assert "finishing" in fin and "all 576.0 MiB sent" in fin and "B/s" not in fin
    wr = next(x for x in lines if "step-00000002" in x)
    assert "writing" in wr and "no progress for 12s" in wr and "ETA --" in wr
    up = next(x for x in lines if "step-00000004" in x)
    assert "measuring" in up and "ETA >4d" in up
    assert "access denied" in next(x for x in lines if "step-00000003" in x)


def test_a_daemon_before_phases_still_renders() -> None:
    old = _job("step-00000001", "committed")
    for key in ("phase", "bytes_done", "rate", "eta", "retry_at", "upload_started"):
        del old[key]
    st = _status([old])
    for key in ("summary", "connections", "saves", "failures", "metrics"):
        del st[key]
    lines = render(st, 100, 30, now=NOW)
    assert any("queued" in x and "step-00000001" in x for x in lines)
    assert "  queued" in job_line(old, now=NOW)


# ---- the daemon side: phases, the rate window, the summary ----------------------------------


def test_phases_and_the_rate_over_a_short_window() -> None:
    job = Job(run="r", tag="t", step=1, store="s3://b")
    job.bytes_total = 100 * MiB
    assert job.phase == Phase.QUEUED
    job.state = JobState.UPLOADING
    # An upload that ran at 10 MiB/s for a minute, then stalled: the rate says so.
    for t in range(0, 61):
        job.samples.append((1000.0 + t, 2, min(t, 50) * MiB))
    job.bytes_uploaded = 50 * MiB
    assert job.rate(now=1060.0) == 0.0 and job.idle(now=1060.0) == 10.0
    assert job.rate(now=1050.0) == pytest.approx(MiB * (50 - (50 - RATE_WINDOW)) / RATE_WINDOW)
    job.samples.append((1061.0, 2, job.bytes_uploaded + 13))  # a 13-byte file: no rate from it
    job.bytes_uploaded += 13
    assert job.rate(now=1061.5) == 0.0 and job.idle(now=1061.5) == 0.5
    job.bytes_uploaded = job.bytes_total
    assert job.phase == Phase.FINISHING and job.as_dict()["phase"] == "finishing"
    job.state = JobState.COMMITTED
    job.retry_at = 2e9
    assert job.phase == Phase.COMMITTED and job.as_dict()["retry_at"] == 2e9
    job.retry_at = 1.0  # its backoff is over: waiting for a worker again
    assert job.phase == Phase.QUEUED


def test_view_lists_active_and_last_finished_and_sums_the_rest() -> None:
    async def go() -> None:
        table = JobTable({}, keep_finished=20)
        few = Job(run="r", tag="first", step=0, store=None, created=-1.0)
        table.add(few)
        await table.finish(few)
        jobs, summary = table.view()
        assert [j["tag"] for j in jobs] == ["first"] and summary["jobs"] == 0  # fewer than 5
        for i in range(100):
            job = Job(run="r", tag=f"t{i:03d}", step=i, store=None, created=float(i))
            job.bytes_total = 10
            table.add(job)
            if i < 97:
                await (table.fail(job, "no") if i % 10 == 0 else table.finish(job))
        jobs, summary = table.view()
        tags = [j["tag"] for j in jobs]
        assert tags == ["t092", "t093", "t094", "t095", "t096", "t097", "t098", "t099"]
        assert summary["jobs"] == 93 and summary["bytes"] == 920 and summary["since"] == -1.0
        assert summary["counts"] == {"failed": 10, "uploaded": 83}
        assert table.stats.saves == 101 and table.stats.failures == 10
        assert len(table.jobs) <= 40  # the table itself stays bounded

    asyncio.run(go())


def test_docs_list_every_field() -> None:
    """docs/status.md documents every field of the reply and of a job."""
    import dataclasses
    import os

    from ckptd.protocol import StatusReport

    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "status.md")) as f:
        text = f.read()
    documented = set(re.findall(r"`([a-z_]+)`", text))
    report = {f.name for f in dataclasses.fields(StatusReport)} - {"rid"}
    job = set(Job(run="r", tag="t", step=1, store=None).as_dict())
    assert not report - documented, report - documented
    assert not job - documented, job - documented
