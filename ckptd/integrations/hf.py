"""Hugging Face Transformers: a ``TrainerCallback`` that saves through the daemon at the
Trainer's save points (``save_strategy``/``save_steps``).

Each save holds the model, the optimizer, and as ``extra`` the scheduler state, the Trainer's
state (``TrainerState`` as JSON) and the RNG states; the tag is ``checkpoint-{global_step}``,
as the Trainer names its folders. With ``skip_trainer_save=True`` the Trainer does not write its
own ``checkpoint-*`` folder at all (the daemon's save replaces it); leave it False when you need
the Trainer's own files (``load_best_model_at_end``, ``resume_from_checkpoint``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from typing import Any

import torch
from transformers import TrainerCallback

from ..errors import ConfigError
from ._common import check_handles

log = logging.getLogger("ckptd.hf")


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _trainer_state(state: Any) -> dict[str, Any]:
    """TrainerState as the JSON the Trainer writes (``trainer_state.json``), across versions."""
    if hasattr(state, "to_json_string"):
        return dict(json.loads(state.to_json_string()))
    return dict(json.loads(json.dumps(dataclasses.asdict(state), default=str)))


class CkptdCallback(TrainerCallback):  # type: ignore[misc]
    """Save model + optimizer + scheduler + trainer state through the daemon at save points.

    Args:
        checkpointer: a ``ckptd.Checkpointer`` (e.g. ``Experiment.checkpointer``).
        skip_trainer_save: save at ``on_step_end`` and tell the Trainer not to write its own.
        wait: None (return once staged), ``"committed"`` or ``"uploaded"``.
    """

    def __init__(
        self, checkpointer: Any, *, skip_trainer_save: bool = False, wait: str | None = None
    ) -> None:
        if wait not in (None, "committed", "uploaded"):
            raise ConfigError(f"wait must be None, 'committed' or 'uploaded', not {wait!r}")
        self.checkpointer = checkpointer
        self.skip_trainer_save = skip_trainer_save
        self.wait = wait
        self.handles: list[Any] = []
        self._saved_step = -1

    def _save(self, state: Any, model: Any, optimizer: Any, lr_scheduler: Any) -> None:
        if not state.is_world_process_zero or state.global_step == self._saved_step:
            return
        extra = {
            "trainer_state": _trainer_state(state),
            "scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
            "rng": _rng_state(),
        }
        # accelerate wraps the optimizer; save (and hook the step fence on) the real one.
        optimizer = getattr(optimizer, "optimizer", optimizer)
        model = getattr(model, "module", model)  # DDP and the like
        handle = self.checkpointer.save(
            state.global_step,
            model=model,
            optimizer=optimizer,
            extra=extra,
            tag=f"checkpoint-{state.global_step}",
        )
        self.handles.append(handle)
        self._saved_step = state.global_step
        if self.wait is not None:
            handle.wait(self.wait)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.skip_trainer_save and control.should_save:
            self._save(
                state, kwargs.get("model"), kwargs.get("optimizer"), kwargs.get("lr_scheduler")
            )
            control.should_save = False  # the daemon's save replaces the Trainer's own

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.skip_trainer_save:
            self._save(
                state, kwargs.get("model"), kwargs.get("optimizer"), kwargs.get("lr_scheduler")
            )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        check_handles(self.handles)  # a failed background save surfaces here, not silently


def restore(
    checkpointer: Any,
    *,
    model: Any,
    optimizer: Any = None,
    lr_scheduler: Any = None,
    tag: str = "latest",
) -> dict[str, Any] | None:
    """Load a ``CkptdCallback`` save into live objects; returns its meta (None: nothing saved)."""
    meta = checkpointer.restore(model=model, optimizer=optimizer, tag=tag)
    if meta is not None and lr_scheduler is not None:
        sched = (meta.get("extra") or {}).get("scheduler")
        if sched is not None:
            lr_scheduler.load_state_dict(sched)
    return meta


__all__ = ["CkptdCallback", "restore"]
