"""Resume anywhere, the Experiment part: a rerun of the same command continues the killed run.

The trainer runs in a subprocess (``_TRAIN``) so that it can be SIGKILLed; on CPU with fixed seeds
the continued run's losses must equal those of a run that was never interrupted, every step must
be in ``metrics.jsonl`` exactly once, and ``run.json`` must say how each attempt ended.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

import ckptd
from ckptd.experiment import Experiment, run_info

STEPS = 8
SAVE_EVERY = 2
WAIT_S = 60.0


def train(opt: dict[str, Any], emit: Any = print) -> None:
    """The training command (``opt`` is its options); ``emit`` gets one JSON line per event.

    Run in a subprocess (``_Trainer``) when it is to be killed, in this process otherwise.
    """
    import torch

    exp = Experiment("proj", "job", socket=opt["socket"], seed=0, config={"lr": 0.05},
                     resume=opt.get("resume", "auto"))  # fmt: skip
    with open(exp.path("run.json"), encoding="utf-8") as f:
        status = json.load(f)["status"]
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optim = torch.optim.Adam(model.parameters(), lr=0.05)
    meta = exp.restore(model=model, optimizer=optim)
    keys = ("step", "epoch", "sample", "metrics")
    emit(json.dumps({"ev": "start", "run": exp.run, "resumed": exp.resumed,
                     "previous": exp.previous_status, "status": status,
                     "meta": None if meta is None else {k: meta.get(k) for k in keys}}))  # fmt: skip
    hang_at = opt.get("hang_at")
    for step in range((meta["step"] + 1) if meta else 1, opt.get("steps", STEPS) + 1):
        gen = torch.Generator().manual_seed(1000 + step)  # a step's data depends on it alone
        x = torch.randn(16, 4, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True).sin())
        optim.zero_grad()
        loss.backward()
        optim.step()
        exp.log_scalar("loss", loss.item(), step=step)
        exp.flush()
        if step % SAVE_EVERY == 0:
            h = exp.checkpointer.save(step, model=model, optimizer=optim, epoch=0, sample=16 * step)
            if hang_at:
                h.wait("uploaded", timeout=WAIT_S)
        if step == hang_at:
            assert exp.sync(timeout=WAIT_S), "records not in the store"
            emit(json.dumps({"ev": "ready", "step": step}))
            sys.stdin.read()  # SIGKILLed here
    assert exp.finish(timeout=WAIT_S)
    emit(json.dumps({"ev": "done"}))


_TRAIN = (
    "import json, sys\n"
    "from tests.test_resume_experiment import train\n"
    "train(json.loads(sys.argv[1]), lambda line: print(line, flush=True))\n"
)


def _train_here(**opt: Any) -> dict[str, Any]:
    """Run the command to its end in this process; returns its start event."""
    lines: list[str] = []
    train(opt, lines.append)
    assert json.loads(lines[-1])["ev"] == "done"
    return json.loads(lines[0])


class _Trainer:
    """The training command in a subprocess; always killed and reaped."""

    def __init__(self, **opt: Any) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _TRAIN, json.dumps(opt)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.start = self.event("start")

    def event(self, kind: str) -> dict[str, Any]:
        """The next event line, within ``WAIT_S`` (a dead or hung trainer fails the test)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + WAIT_S
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {kind!r} event from the trainer in {WAIT_S} s"
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            assert line, f"the trainer exited ({self.proc.wait(10)}) before {kind!r}"
            msg = json.loads(line)
            assert msg["ev"] == kind, msg
            return msg

    def finish(self) -> None:
        self.event("done")
        assert self.proc.wait(WAIT_S) == 0

    def sigkill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(WAIT_S) == -signal.SIGKILL

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT_S)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


@pytest.fixture
def trainers():  # type: ignore[no-untyped-def]
    made: list[_Trainer] = []

    def start(**opt: Any) -> _Trainer:
        t = _Trainer(**opt)
        made.append(t)
        return t

    yield start
    for t in made:
        t.close()


def _rows(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _store_texts(store: str, prefix: str, *names: str) -> dict[str, str]:
    """Several objects under ``<store>/<prefix>/`` in one session (a session costs ~0.5 s)."""
    from ckptd.catalog import run_sync
    from ckptd.storage import join_key, open_store

    async def go() -> dict[str, str]:
        async with open_store(store) as st:
            return {n: (await st.get_bytes(join_key(prefix, n))).decode() for n in names}

    return run_sync(go())


def _losses(rows: list[dict[str, Any]]) -> dict[int, float]:
    steps = [r["step"] for r in rows if r["key"] == "loss"]
    assert sorted(steps) == list(range(1, STEPS + 1)), steps  # each step exactly once
    return {r["step"]: r["value"] for r in rows if r["key"] == "loss"}


def test_rerun_on_a_fresh_machine_continues_the_killed_run(  # type: ignore[no-untyped-def]
    make_daemon, s3_bucket, trainers
) -> None:
    store = f"s3://{s3_bucket}/exp"
    d1 = make_daemon(store=store, name="d1")
    ref = _train_here(socket=d1.socket, resume="never")  # run A: never interrupted
    (ref_metrics,) = _store_texts(store, f"{ref['run']}/experiment", "metrics.jsonl").values()
    want = _losses(_rows(ref_metrics))

    b = trainers(socket=d1.socket, hang_at=5)  # run B: killed after two saves reached the store
    assert b.start["run"] != ref["run"] and not b.start["resumed"]
    assert b.event("ready")["step"] == 5  # steps 1..5 logged, checkpoints at 2 and 4
    b.sigkill()
    d1.kill()  # the machine is gone: its daemon and its disk
    shutil.rmtree(d1.root)
    run = b.start["run"]
    info = run_info(f"{store}/{run}")
    assert (info["recorded_status"], info["status"]) == ("running", "interrupted")

    d2 = make_daemon(store=store, name="d2")  # a fresh machine: new daemon, new root
    again = trainers(socket=d2.socket)  # the same command
    start = again.start
    assert (start["run"], start["resumed"], start["previous"]) == (run, True, "interrupted")
    assert start["status"] == "running"
    meta = start["meta"]
    assert (meta["step"], meta["epoch"], meta["sample"]) == (4, 0, 64)
    assert meta["metrics"] == {"loss": want[4]}
    again.finish()

    names = ("metrics.jsonl", "metrics.superseded.jsonl", "run.json", "main.log")
    got = _store_texts(store, f"{run}/experiment", *names)
    assert _losses(_rows(got["metrics.jsonl"])) == want  # bit for bit: the same steps as run A
    superseded = [r["step"] for r in _rows(got["metrics.superseded.jsonl"])]
    assert superseded == [5]  # logged after the checkpoint, then replaced
    record = json.loads(got["run.json"])
    assert record["status"] == "finished" and record["attempt"] == 2
    assert [a["status"] for a in record["attempts"]] == ["interrupted"]
    main_log = got["main.log"]  # the old log, continued
    assert f"experiment {run} in" in main_log and f"experiment {run} resumed" in main_log


def test_two_reruns_and_a_new_run_on_request(make_daemon, trainers) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon()  # the root is the store: the same machine, disk kept
    b = trainers(socket=d.socket, hang_at=3)
    b.event("ready")
    b.sigkill()
    run = b.start["run"]
    assert run_info(os.path.join(d.root, run))["status"] == "interrupted"

    fresh = _train_here(socket=d.socket, resume="never")  # a new run, from scratch, to the end
    assert fresh["run"] != run and not fresh["resumed"]
    want = _losses(_rows(_read(os.path.join(d.root, fresh["run"]), "metrics.jsonl")))

    first = trainers(socket=d.socket, hang_at=5)  # the newest unfinished run is B's
    assert (first.start["run"], first.start["previous"]) == (run, "interrupted")
    assert first.start["meta"]["step"] == 2
    first.event("ready")
    first.sigkill()
    second = trainers(socket=d.socket)
    assert (second.start["run"], second.start["previous"]) == (run, "interrupted")
    assert second.start["meta"]["step"] == 4
    second.finish()

    assert _losses(_rows(_read(os.path.join(d.root, run), "metrics.jsonl"))) == want
    record = json.loads(_read(os.path.join(d.root, run), "run.json"))
    assert record["status"] == "finished" and record["attempt"] == 3
    assert [a["status"] for a in record["attempts"]] == ["interrupted", "interrupted"]

    # Everything finished: the same command starts a new run.
    exp = Experiment("proj", "job", socket=d.socket, capture_logs=False)
    try:
        assert exp.run not in (run, fresh["run"]) and not exp.resumed
    finally:
        exp.finish()


def _read(run_dir: str, rel: str) -> str:
    with open(os.path.join(run_dir, "experiment", rel), encoding="utf-8") as f:
        return f.read()


# ---- in-process: choosing the run, rewinding, the option -----------------------------------------


def _exp(base: str, **kw: Any) -> Experiment:
    return Experiment("p", "r", connect=False, base_dir=base, capture_logs=False, **kw)


@pytest.mark.parametrize("bad", ["sometimes", "", 3, "other/name/ts", "../up", "p/r"])
def test_resume_refuses_unknown_values(tmp_path, bad) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ckptd.ConfigError):
        _exp(str(tmp_path), resume=bad)


def test_resume_a_named_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ckptd.ConfigError, match="neither"):  # no such run
        _exp(str(tmp_path), resume="2020-01-01_00-00-00")
    a = _exp(str(tmp_path), timestamp="t1")
    a.log_scalar("loss", 1.0, step=1)
    a.finish()
    b = _exp(str(tmp_path), resume="p/r/t1")  # even a finished one, when named
    try:
        assert (b.run, b.resumed, b.previous_status) == ("p/r/t1", True, "finished")
    finally:
        b.finish()
    with pytest.raises(ckptd.ConfigError):
        _exp(str(tmp_path), resume="t1", timestamp="t2")


def test_auto_continues_the_newest_unfinished_run_and_rewinds(tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = str(tmp_path)
    done = _exp(base, timestamp="a-done")
    done.finish()
    failed = _exp(base, timestamp="b-failed")
    for step in range(1, 5):
        failed.log_scalar("loss", float(step), step=step)
    failed.finish("failed")
    live = _exp(base, timestamp="c-live")  # a writer that still runs: never taken over
    try:
        again = _exp(base)
        try:
            assert (again.run, again.resumed, again.previous_status) == ("p/r/b-failed", True,
                                                                          "failed")  # fmt: skip
            assert again.dir == failed.dir
            again.log_scalar("loss", 30.0, step=3)  # this attempt's lines are never dropped
            assert again.rewind(2) == 2  # steps 3 and 4 of the earlier attempt
        finally:
            again.finish()
        rows = _rows(_read_plain(failed.dir, "metrics.jsonl"))
        assert [(r["step"], r["value"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
        superseded = _rows(_read_plain(failed.dir, "metrics.superseded.jsonl"))
        assert [r["step"] for r in superseded] == [3, 4]
        record = json.loads(_read_plain(failed.dir, "run.json"))
        assert record["status"] == "finished" and record["attempts"][0]["status"] == "failed"
        assert run_info(failed.dir)["status"] == "finished"
        assert run_info(live.dir)["status"] == "running"
        new = _exp(base)  # all finished but the live one: a new run
        try:
            assert new.run not in ("p/r/a-done", "p/r/b-failed", "p/r/c-live")
            assert not new.resumed
        finally:
            new.finish()
        never = _exp(base, resume="never")
        never.finish()
        assert never.run != new.run and not never.resumed
    finally:
        live.finish()


def _read_plain(folder: str, rel: str) -> str:
    with open(os.path.join(folder, rel), encoding="utf-8") as f:
        return f.read()


def test_checkpointer_restore_rewinds_to_the_step_it_restored(daemon) -> None:  # type: ignore[no-untyped-def]
    import torch

    model = torch.nn.Linear(2, 1)
    first = Experiment("p", "ck", socket=daemon.socket, capture_logs=False)
    for step in range(1, 6):
        first.log_scalar("loss", float(step), step=step)
        first.log_scalar("acc", step / 10, step=step)
        if step % 2 == 0:
            first.checkpointer.save(step, model=model, epoch=1, sample=step * 4)
    first.finish("failed")
    again = Experiment("p", "ck", socket=daemon.socket, capture_logs=False)
    try:
        assert (again.run, again.previous_status) == (first.run, "failed")
        rows = _rows(_read_plain(again.dir, "metrics.jsonl"))
        assert max(r["step"] for r in rows) == 4  # at once: the newest checkpoint's step
        meta = again.checkpointer.restore(model, tag="E1_U2_S8")  # an older one, directly
        assert meta is not None and (meta["step"], meta["epoch"], meta["sample"]) == (2, 1, 8)
        assert meta["metrics"] == {"loss": 2.0, "acc": 0.2}
        again.log_scalar("loss", 3.5)  # the default step continues after the restored one
    finally:
        again.finish()
    rows = _rows(_read_plain(again.dir, "metrics.jsonl"))
    assert [(r["step"], r["key"]) for r in rows] == [
        (1, "loss"), (1, "acc"), (2, "loss"), (2, "acc"), (3, "loss"),
    ]  # fmt: skip
    assert rows[-1]["value"] == 3.5
    superseded = _rows(_read_plain(again.dir, "metrics.superseded.jsonl"))
    assert sorted({r["step"] for r in superseded}) == [3, 4, 5]
