"""Hugging Face Transformers: a ``TrainerCallback`` that saves through the daemon at the
Trainer's save points (``save_strategy``/``save_steps``), and resuming from the store.

Each save holds the model, the optimizer, and as ``extra`` the scheduler, grad scaler, the
Trainer's state (``TrainerState`` as JSON) and the RNG states in the Trainer's own layout; the
tag is ``checkpoint-{global_step}``, as the Trainer names its folders.

Resuming: the Trainer resumes only from a folder of its own files, so ``resume_checkpoint``
writes one (``<output_dir>/checkpoint-<step>``) from the newest checkpoint that verifies, in the
daemon's root or else the store; the Trainer then restores global step, epoch, data position,
optimizer, scheduler, scaler, RNG and log history itself, exactly as from its own save::

    trainer.train(resume_from_checkpoint=resume_checkpoint(args.output_dir, ckpt))

It returns None when the run has nothing yet, so the same line starts a fresh run. Saves after a
resume continue past the restored step, so their tags never collide. A save that fails in the
background stops training at the next step (the callback raises), not at the end.

With ``skip_trainer_save=True`` the Trainer does not write its own ``checkpoint-*`` folder at all
(the daemon's save, taken at ``on_step_end``, replaces it; its ``log_history`` then lacks that
step's own log line). Leave it False for ``load_best_model_at_end``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from typing import Any

import torch
from transformers import TrainerCallback

from ..atomic import temp_name
from ..errors import ConfigError, SaveError
from ._common import existing_tags, newest, raise_failed, run_urls

log = logging.getLogger("ckptd.hf")

# The Trainer's file names (transformers.trainer: TRAINER_STATE_NAME, OPTIMIZER_NAME, ...).
_WEIGHTS = "model.safetensors"
_FILES = {
    "trainer_state": "trainer_state.json",
    "optimizer": "optimizer.pt",
    "scheduler": "scheduler.pt",
    "scaler": "scaler.pt",
    "rng": "rng_state.pth",
}


def _rng_state() -> dict[str, Any]:
    """The RNG states under the keys of the Trainer's ``rng_state.pth``."""
    state: dict[str, Any] = {"python": random.getstate(), "cpu": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _trainer_state(state: Any) -> dict[str, Any]:
    """TrainerState as the JSON the Trainer writes (``trainer_state.json``), across versions."""
    if hasattr(state, "to_json_string"):
        return dict(json.loads(state.to_json_string()))
    return dict(json.loads(json.dumps(dataclasses.asdict(state), default=str)))


class CkptdCallback(TrainerCallback):  # type: ignore[misc]
    """Save model + optimizer + scheduler + scaler + RNG + trainer state through the daemon.

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
        self._existing: set[str] | None = None

    def _tag_free(self, tag: str) -> None:
        """Refuse a tag the run already has, now and with the fix, not from the daemon later."""
        if self._existing is None:
            self._existing = existing_tags(run_urls(self.checkpointer))
        if tag in self._existing:
            raise SaveError(
                f"checkpoint {tag} already exists in run {self.checkpointer.run}: this training "
                "was not resumed from it; resume with trainer.train(resume_from_checkpoint="
                "ckptd.integrations.hf.resume_checkpoint(args.output_dir, checkpointer)), or "
                "save into a new run"
            )

    def _save(self, state: Any, model: Any, optimizer: Any, lr_scheduler: Any) -> None:
        if not state.is_world_process_zero or state.global_step == self._saved_step:
            return
        raise_failed(self.handles)
        tag = f"checkpoint-{state.global_step}"
        self._tag_free(tag)
        scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer has it
        extra = {
            "trainer_state": _trainer_state(state),
            "scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
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
            tag=tag,
            epoch=int(state.epoch) if state.epoch is not None else None,
        )
        self.handles = [h for h in self.handles if not h.done() or h.state == "failed"]
        self.handles.append(handle)
        if self._existing is not None:
            self._existing.add(tag)
        self._saved_step = state.global_step
        if self.wait is not None:
            handle.wait(self.wait)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._saved_step = state.global_step  # resumed at this step: it is saved already
        if getattr(self.checkpointer, "saves", True) and state.is_world_process_zero:
            self._existing = existing_tags(run_urls(self.checkpointer))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        raise_failed(self.handles)  # a background failure stops training at the next step
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
        raise_failed(self.handles)


def resume_checkpoint(
    output_dir: str,
    checkpointer: Any = None,
    *,
    run: str | None = None,
    store: str | None = None,
    tag: str = "latest",
) -> str | None:
    """Write the run's newest verified checkpoint as a Trainer checkpoint folder; its path.

    For ``trainer.train(resume_from_checkpoint=...)``. Looks in the checkpointer's daemon root and
    store (or, without a checkpointer, in ``<store>/<run>``). None when the run has no checkpoint
    yet: the Trainer then starts from scratch. Tensors come from ckptd's verified files; the
    ``.pt`` files are written here with ``torch.save`` because that is what the Trainer reads.
    """
    if checkpointer is not None:
        urls = run_urls(checkpointer)
    elif run is not None and store is not None:
        from ..storage import join_key

        urls = [join_key(store, run) if "://" in store else os.path.join(store, run)]
    else:
        raise ConfigError("resume_checkpoint needs a checkpointer, or run= and store=")
    state = newest(urls, tag)
    if state is None:
        log.info("no checkpoint in %s: training starts from scratch", " or ".join(urls))
        return None
    extra = state.get("extra") or {}
    trainer_state = extra.get("trainer_state")
    if not isinstance(trainer_state, dict):
        raise ConfigError(
            f"checkpoint {state['meta'].get('tag')} was not saved by CkptdCallback "
            "(no trainer_state): load it with ckptd.load or Checkpointer.restore"
        )
    step = int(trainer_state.get("global_step", state["meta"].get("step", 0)))
    folder = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = temp_name(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _write_weights(state["model"], os.path.join(tmp, _WEIGHTS))
    if state.get("optimizer") is not None:
        torch.save(state["optimizer"], os.path.join(tmp, _FILES["optimizer"]))
    for key in ("scheduler", "scaler"):
        if extra.get(key) is not None:
            torch.save(extra[key], os.path.join(tmp, _FILES[key]))
    rng = _hf_rng(extra.get("rng"))
    if rng is not None:
        torch.save(rng, os.path.join(tmp, _FILES["rng"]))
    with open(os.path.join(tmp, _FILES["trainer_state"]), "w", encoding="utf-8") as f:
        json.dump(trainer_state, f, indent=2, sort_keys=True)
    # The ckptd copy is verified; a folder already there may be a save cut off by the kill.
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    log.info("resuming from %s@%s (step %d) via %s",
             state["meta"].get("run_id", ""), state["meta"].get("tag"), step, folder)  # fmt: skip
    return folder


def _write_weights(sd: dict[str, Any], path: str) -> None:
    """``model.safetensors`` as the Trainer loads it (``load_state_dict(strict=False)``): tied
    weights once (safetensors refuses shared storage; the tie restores the alias)."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    tensors: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            continue
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ident in seen and value.numel():
            continue
        seen.add(ident)
        tensors[key] = value.contiguous()
    save_file(tensors, path, metadata={"format": "pt"})


def _hf_rng(rng: Any) -> dict[str, Any] | None:
    """``rng_state.pth`` content: Python's state as the tuple ``random.setstate`` wants; saves
    from before 2026-12 named the CPU state ``torch``."""
    if not isinstance(rng, dict):
        return None
    out = dict(rng)
    if "torch" in out and "cpu" not in out:
        out["cpu"] = out.pop("torch")
    py = out.get("python")
    if isinstance(py, list | tuple) and len(py) == 3:
        out["python"] = (py[0], tuple(py[1]), py[2])
    if "numpy" in out and isinstance(out["numpy"], list):
        out["numpy"] = tuple(out["numpy"])
    if isinstance(out.get("cuda"), list):  # older saves: every device's state
        out["cuda"] = out["cuda"][0] if out["cuda"] else None
        if out["cuda"] is None:
            del out["cuda"]
    return out


def restore(
    checkpointer: Any,
    *,
    model: Any,
    optimizer: Any = None,
    lr_scheduler: Any = None,
    tag: str = "latest",
) -> dict[str, Any] | None:
    """Load a ``CkptdCallback`` save into live objects; returns its meta (None: nothing saved).

    For a loop of your own. To resume a Trainer, use ``resume_checkpoint``: this restores the
    weights and optimizer but not the Trainer's step, data position or log history.
    """
    meta = checkpointer.restore(model=model, optimizer=optimizer, tag=tag)
    if meta is not None and lr_scheduler is not None:
        sched = (meta.get("extra") or {}).get("scheduler")
        if sched is not None:
            lr_scheduler.load_state_dict(sched)
    return meta


__all__ = ["CkptdCallback", "restore", "resume_checkpoint"]
