"""Callbacks for a plain PyTorch loop: checkpoints and records at the loop's natural points.

The loop calls a ``CallbackList`` at each point; the list keeps the progress (epoch, optimizer
step, samples) in a ``TrainState`` and calls every callback that runs on this rank, lowest
``priority`` first (ties keep the order given)::

    cbs = CallbackList([CheckpointEvery(ckpt, steps=100), UploadExperiment(exp)],
                       model=model, optimizer=opt)
    cbs.on_train_begin()
    for epoch in range(cbs.state.epoch, epochs):
        cbs.on_epoch_begin(epoch)
        for batch in loader:
            cbs.on_batch_begin(batch)
            ...; opt.step()
            cbs.on_after_optimizer_step(samples=len(batch))
            cbs.on_batch_end(logs={"loss": loss.item()})
        cbs.on_epoch_end()
    cbs.on_train_end()
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

log = logging.getLogger("ckptd.callbacks")

ALL_RANKS = "all"


def current_rank() -> int:
    """This process's global rank: torch.distributed when initialized, else ``$RANK``, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@dataclass(kw_only=True, slots=True)
class TrainState:
    """What callbacks see and may change."""

    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    epoch: int = 0
    """The current epoch (set by ``on_epoch_begin``)."""
    step: int = 0
    """Optimizer steps taken so far (advanced by ``on_after_optimizer_step``)."""
    batch_idx: int = -1
    """Index of the current batch within its epoch."""
    sample: int | None = None
    """Samples seen so far, when the loop reports them."""
    batch: Any = None
    logs: dict[str, Any] = field(default_factory=dict)
    should_stop: bool = False
    """A callback sets it to ask the loop to stop."""


class Callback:
    """Override the hooks you need. ``priority``: lower runs first. ``ranks``: a set of global
    ranks to run on, or ``"all"``."""

    priority: int = 0
    ranks: frozenset[int] | str = ALL_RANKS

    def on_train_begin(self, state: TrainState) -> None: ...
    def on_epoch_begin(self, state: TrainState) -> None: ...
    def on_batch_begin(self, state: TrainState) -> None: ...
    def on_after_optimizer_step(self, state: TrainState) -> None: ...
    def on_batch_end(self, state: TrainState) -> None: ...
    def on_epoch_end(self, state: TrainState) -> None: ...
    def on_train_end(self, state: TrainState) -> None: ...

    def runs_on(self, rank: int) -> bool:
        return self.ranks == ALL_RANKS or rank in self.ranks


def _ranks(ranks: Iterable[int] | str | int) -> frozenset[int] | str:
    if ranks == ALL_RANKS:
        return ALL_RANKS
    if isinstance(ranks, str):
        raise ConfigError(f"ranks must be 'all' or a set of ints, not {ranks!r}")
    if isinstance(ranks, int):
        return frozenset({ranks})
    return frozenset(int(r) for r in ranks)


class CallbackList:
    """Runs callbacks in order and owns the progress counters."""

    def __init__(
        self,
        callbacks: Iterable[Callback] = (),
        *,
        state: TrainState | None = None,
        rank: int | None = None,
        **state_fields: Any,
    ) -> None:
        self.state = state or TrainState(**state_fields)
        self.rank = current_rank() if rank is None else rank
        # sorted() is stable: equal priorities keep the order they were given in.
        self.callbacks = sorted(callbacks, key=lambda c: c.priority)

    def add(self, callback: Callback) -> None:
        self.callbacks = sorted([*self.callbacks, callback], key=lambda c: c.priority)

    def _fire(self, hook: str) -> None:
        for cb in self.callbacks:
            if cb.runs_on(self.rank):
                getattr(cb, hook)(self.state)

    def on_train_begin(self) -> None:
        self._fire("on_train_begin")

    def on_epoch_begin(self, epoch: int | None = None) -> None:
        if epoch is not None:
            self.state.epoch = epoch
        self.state.batch_idx = -1
        self._fire("on_epoch_begin")

    def on_batch_begin(self, batch: Any = None) -> None:
        self.state.batch_idx += 1
        self.state.batch = batch
        self._fire("on_batch_begin")

    def on_after_optimizer_step(self, samples: int | None = None) -> None:
        self.state.step += 1
        if samples is not None:
            self.state.sample = (self.state.sample or 0) + samples
        self._fire("on_after_optimizer_step")

    def on_batch_end(self, logs: dict[str, Any] | None = None) -> None:
        if logs:
            self.state.logs.update(logs)
        self._fire("on_batch_end")
        self.state.batch = None

    def on_epoch_end(self) -> None:
        self._fire("on_epoch_end")
        self.state.epoch += 1  # a resumed loop starts at the next epoch

    def on_train_end(self) -> None:
        self._fire("on_train_end")


class CheckpointEvery(Callback):
    """Save through the daemon every ``steps`` optimizer steps or every ``epochs`` epochs.

    ``resume=True`` restores the newest checkpoint at ``on_train_begin`` and sets the progress
    from it, so a restarted job continues where the last save left off. ``extra`` is called at
    each save for plain data to keep beside (scheduler, RNG states). Saves only on rank 0 by
    default: with data parallelism every rank holds the same weights.
    """

    priority = 100  # after callbacks that change the state at the same point

    def __init__(
        self,
        checkpointer: Any,
        *,
        steps: int | None = None,
        epochs: int | None = None,
        at_end: bool = True,
        resume: bool = False,
        extra: Callable[[TrainState], Any] | None = None,
        ranks: Iterable[int] | str | int = (0,),
    ) -> None:
        if (steps is None) == (epochs is None):
            raise ConfigError("give exactly one of steps= or epochs=")
        for what, n in (("steps", steps), ("epochs", epochs)):
            if n is not None and (not isinstance(n, int) or n < 1):
                raise ConfigError(f"{what} must be a positive int, not {n!r}")
        self.checkpointer = checkpointer
        self.steps, self.epochs = steps, epochs
        self.at_end, self.resume, self.extra = at_end, resume, extra
        self.ranks = _ranks(ranks)
        self.handles: list[Any] = []
        self._last_saved = -1

    def _save(self, state: TrainState) -> None:
        if state.step == self._last_saved:
            return
        if state.scheduler is not None and self.extra is None:
            extra: Any = {"scheduler": state.scheduler.state_dict()}
        else:
            extra = self.extra(state) if self.extra is not None else None
        extra = {"ckptd_loop": {"epoch": state.epoch, "step": state.step}, "user": extra}
        self.handles.append(
            self.checkpointer.save(
                state.step,
                model=state.model,
                optimizer=state.optimizer,
                extra=extra,
                epoch=state.epoch,
                sample=state.sample,
            )
        )
        self._last_saved = state.step

    def on_train_begin(self, state: TrainState) -> None:
        if not self.resume:
            return
        meta = self.checkpointer.restore(model=state.model, optimizer=state.optimizer)
        if meta is None:
            return
        extra = meta.get("extra") or {}
        loop = extra.get("ckptd_loop", {}) if isinstance(extra, dict) else {}
        state.step = int(loop.get("step", meta.get("step", 0)))
        state.epoch = int(loop.get("epoch", 0))
        state.sample = (meta.get("training_iteration") or {}).get("sample")
        user = extra.get("user") if isinstance(extra, dict) else None
        if state.scheduler is not None and self.extra is None and isinstance(user, dict):
            state.scheduler.load_state_dict(user["scheduler"])
        self._last_saved = state.step
        log.info("resumed from step %d (epoch %d)", state.step, state.epoch)

    def on_after_optimizer_step(self, state: TrainState) -> None:
        if self.steps is not None and state.step % self.steps == 0:
            self._save(state)

    def on_epoch_end(self, state: TrainState) -> None:
        if self.epochs is not None and (state.epoch + 1) % self.epochs == 0:
            self._save(state)

    def on_train_end(self, state: TrainState) -> None:
        if self.at_end and state.step > 0:
            self._save(state)
        for h in self.handles:
            if h.state == "failed" and h.path is None:  # failed before reaching the daemon's disk
                h.check()


class UploadExperiment(Callback):
    """Push the experiment records (metrics, logs, results) to the store at epoch end and at the
    end of training, so a run lost mid-way keeps its records up to its last epoch."""

    priority = 200  # after the checkpoint and whatever wrote records at the same point

    def __init__(
        self,
        experiment: Any,
        *,
        every_epochs: int = 1,
        epoch_timeout: float = 0.0,
        end_timeout: float | None = 60.0,
        finish: bool = False,
        ranks: Iterable[int] | str | int = (0,),
    ) -> None:
        if every_epochs < 1:
            raise ConfigError("every_epochs must be at least 1")
        self.experiment = experiment
        self.every_epochs = every_epochs
        self.epoch_timeout = epoch_timeout
        self.end_timeout = end_timeout
        self.finish = finish
        self.ranks = _ranks(ranks)

    def on_batch_end(self, state: TrainState) -> None:
        self.experiment.flush()  # one update: metrics to the OS, next default step

    def on_epoch_end(self, state: TrainState) -> None:
        if (state.epoch + 1) % self.every_epochs == 0:
            self.experiment.sync(timeout=self.epoch_timeout)  # 0: push now, don't wait

    def on_train_end(self, state: TrainState) -> None:
        if self.finish:
            self.experiment.finish(timeout=self.end_timeout)
        else:
            self.experiment.sync(timeout=self.end_timeout)


__all__ = [
    "ALL_RANKS",
    "Callback",
    "CallbackList",
    "CheckpointEvery",
    "TrainState",
    "UploadExperiment",
    "current_rank",
]
