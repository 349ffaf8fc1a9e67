"""The plain-loop callback API: order, rank filter, CheckpointEvery (and resume), UploadExperiment."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ckptd
from ckptd import Checkpointer
from ckptd.callbacks import (
    Callback,
    CallbackList,
    CheckpointEvery,
    TrainState,
    UploadExperiment,
    current_rank,
)
from ckptd.experiment import Experiment
from tests.helpers import Net, bitwise_equal


class Recorder(Callback):
    def __init__(self, name: str, calls: list[str], priority: int = 0, ranks=None) -> None:  # type: ignore[no-untyped-def]
        self.name, self.calls, self.priority = name, calls, priority
        if ranks is not None:
            self.ranks = ranks

    def on_epoch_end(self, state: TrainState) -> None:
        self.calls.append(self.name)


def test_order_is_by_priority_and_stable() -> None:
    calls: list[str] = []
    cbs = CallbackList(
        [Recorder("b", calls, 5), Recorder("a1", calls), Recorder("z", calls, -1), Recorder("a2", calls)],
        rank=0,
    )  # fmt: skip
    cbs.on_epoch_end()
    assert calls == ["z", "a1", "a2", "b"]
    assert cbs.state.epoch == 1


def test_rank_filter(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[str] = []
    cbs = [Recorder("all", calls), Recorder("zero", calls, ranks=frozenset({0}))]
    CallbackList(cbs, rank=1).on_epoch_end()
    assert calls == ["all"]
    monkeypatch.setenv("RANK", "3")
    assert current_rank() == 3
    calls.clear()
    CallbackList(cbs).on_epoch_end()  # rank from $RANK
    assert calls == ["all"]
    monkeypatch.setenv("RANK", "0")
    calls.clear()
    CallbackList(cbs).on_epoch_end()
    assert calls == ["all", "zero"]


def test_bad_arguments() -> None:
    with pytest.raises(ckptd.ConfigError):
        CheckpointEvery(None)
    with pytest.raises(ckptd.ConfigError):
        CheckpointEvery(None, steps=2, epochs=1)
    with pytest.raises(ckptd.ConfigError):
        CheckpointEvery(None, steps=0)
    with pytest.raises(ckptd.ConfigError):
        CheckpointEvery(None, steps=1, ranks="some")


def _loop(cbs: CallbackList, epochs: int, batches: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    model, opt, sched = cbs.state.model, cbs.state.optimizer, cbs.state.scheduler
    cbs.on_train_begin()
    for epoch in range(cbs.state.epoch, epochs):
        cbs.on_epoch_begin(epoch)
        for _ in range(batches):
            x = torch.randint(0, 64, (8, 5), generator=gen)
            cbs.on_batch_begin(x)
            loss = model(x).logsumexp(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            cbs.on_after_optimizer_step(samples=8)
            cbs.on_batch_end({"loss": loss.item()})
        cbs.on_epoch_end()
    cbs.on_train_end()


def _trio() -> tuple[Net, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def test_checkpoint_every_steps_then_resume(daemon) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model, opt, sched = _trio()
    with Checkpointer("cb/steps", socket=daemon.socket) as ckpt:
        every = CheckpointEvery(ckpt, steps=4)
        _loop(CallbackList([every], model=model, optimizer=opt, scheduler=sched, rank=0), 2, 3)
        for h in every.handles:
            h.wait("committed", timeout=60)
    tags = [m["tag"] for m in ckptd.list_checkpoints(os.path.join(daemon.root, "cb/steps"))]
    assert tags == ["E1_U4_S32", "E2_U6_S48"]  # step 4 (in epoch 1), then the end of training

    torch.manual_seed(1)  # different weights: only the restore can make them equal
    model2, opt2, sched2 = _trio()
    with Checkpointer("cb/steps", socket=daemon.socket) as ckpt:
        state = TrainState(model=model2, optimizer=opt2, scheduler=sched2)
        CheckpointEvery(ckpt, steps=4, resume=True).on_train_begin(state)
    assert (state.step, state.epoch, state.sample) == (6, 2, 48)
    assert bitwise_equal(model2.state_dict(), model.state_dict())
    assert bitwise_equal(opt2.state_dict(), opt.state_dict())
    assert sched2.state_dict() == sched.state_dict()


def test_checkpoint_every_epoch_and_not_on_other_ranks(daemon) -> None:  # type: ignore[no-untyped-def]
    model, opt, sched = _trio()
    with Checkpointer("cb/epochs", socket=daemon.socket) as ckpt:
        every = CheckpointEvery(ckpt, epochs=1, at_end=False)
        _loop(CallbackList([every], model=model, optimizer=opt, scheduler=sched, rank=0), 2, 2)
        on_rank1 = CheckpointEvery(ckpt, epochs=1)
        _loop(CallbackList([on_rank1], model=model, optimizer=opt, scheduler=sched, rank=1), 1, 1)
        assert on_rank1.handles == []
    assert [h.step for h in every.handles] == [2, 4]


def test_upload_experiment_flushes_each_update(daemon) -> None:  # type: ignore[no-untyped-def]
    model, opt, sched = _trio()

    class LogLoss(Callback):
        priority = -10  # before UploadExperiment ends the update

        def on_batch_end(self, state: TrainState) -> None:
            exp.log_scalar("loss", state.logs["loss"])

    exp = Experiment("p", "cb", socket=daemon.socket, capture_logs=False)
    cbs = CallbackList(
        [UploadExperiment(exp, finish=True), LogLoss()],
        model=model,
        optimizer=opt,
        scheduler=sched,
        rank=0,
    )
    _loop(cbs, 2, 2)
    with open(exp.path("metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [0, 1, 2, 3]
    with open(exp.path("run.json")) as f:
        assert json.load(f)["status"] == "finished"
