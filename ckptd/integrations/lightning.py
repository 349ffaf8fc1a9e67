"""PyTorch Lightning: save through the daemon (``CkptdCheckpointIO``) and keep the records.

``Trainer(plugins=[CkptdCheckpointIO(ckpt)])`` makes every Lightning save (``ModelCheckpoint``,
``trainer.save_checkpoint``) a ckptd save: the model's ``state_dict`` as the model, each optimizer
state as ``optimizer{i}``, the rest of Lightning's dict (loops, callbacks, schedulers, hparams) as
plain ``extra``. At Lightning's path it writes a small JSON stub naming the run and tag, so that
Lightning's own bookkeeping (``last.ckpt`` lookup, ``ckpt_path=``) works and ``load_checkpoint``
knows what to fetch. Uses ``lightning.pytorch`` when installed, else ``pytorch_lightning``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
except ImportError:
    import pytorch_lightning as pl
    from lightning_fabric.plugins import CheckpointIO, TorchCheckpointIO

from ..errors import ConfigError
from ._common import check_handles, load_tag, plain, run_urls, tag_for

log = logging.getLogger("ckptd.lightning")

STUB_FORMAT = "ckptd-stub/1"


def read_stub(path: str) -> dict[str, Any] | None:
    """The stub at ``path``, or None when the file is something else (a torch checkpoint)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        stub = json.loads(head)
    except (OSError, ValueError):
        return None
    return stub if isinstance(stub, dict) and stub.get("format") == STUB_FORMAT else None


class CkptdCheckpointIO(CheckpointIO):
    """Lightning's checkpoint IO through the ckptd daemon.

    Args:
        checkpointer: a ``ckptd.Checkpointer`` (e.g. ``Experiment.checkpointer``).
        wait: ``None`` (return once staged: training goes on while the daemon writes),
            ``"committed"`` or ``"uploaded"``.
    """

    def __init__(self, checkpointer: Any, *, wait: str | None = None) -> None:
        if wait not in (None, "committed", "uploaded"):
            raise ConfigError(f"wait must be None, 'committed' or 'uploaded', not {wait!r}")
        self.checkpointer = checkpointer
        self.wait = wait
        self.handles: dict[str, Any] = {}
        self._used: set[str] = set()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        path = os.fspath(path)
        step = int(checkpoint.get("global_step", 0))
        tag = tag_for(path, step, self._used)
        rest = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        optims = checkpoint.get("optimizer_states") or []
        handle = self.checkpointer.save(
            step,
            model=checkpoint.get("state_dict"),
            optimizers={f"optimizer{i}": sd for i, sd in enumerate(optims)},
            extra={"lightning": plain(rest), "optimizers": len(optims)},
            tag=tag,
            epoch=checkpoint.get("epoch"),
        )
        self.handles[tag] = handle
        stub = {
            "format": STUB_FORMAT,
            "run": self.checkpointer.run,
            "tag": tag,
            "step": step,
            "urls": run_urls(self.checkpointer),
        }
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(stub, f)
        os.replace(tmp, path)
        if self.wait is not None:
            handle.wait(self.wait)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        path = os.fspath(path)
        stub = read_stub(path)
        if stub is None:
            # Not ours (a checkpoint from before ckptd): Lightning's own loader reads it.
            return TorchCheckpointIO().load_checkpoint(path, map_location, weights_only)
        handle = self.handles.get(stub["tag"])
        if handle is not None and handle.state == "staged":
            handle.wait("committed")  # saved by this process and still being written
        location = map_location if isinstance(map_location, str | None) else "cpu"
        state = load_tag(list(stub["urls"]), stub["tag"], location or "cpu")
        extra = state["extra"] or {}
        out = dict(extra.get("lightning") or {})
        out["state_dict"] = state["model"]
        out["optimizer_states"] = [
            state["optimizers"][f"optimizer{i}"] for i in range(int(extra.get("optimizers", 0)))
        ]
        return out

    def remove_checkpoint(self, path: Any) -> None:
        """Drop Lightning's stub. The checkpoint itself stays in the store: deleting there is the
        daemon's retention (``--keep-last``), which knows what is uploaded."""
        path = os.fspath(path)
        if read_stub(path) is not None:
            os.unlink(path)
        elif os.path.exists(path):
            TorchCheckpointIO().remove_checkpoint(path)

    def teardown(self) -> None:
        check_handles(self.handles.values())


class CkptdExperimentCallback(pl.Callback):
    """Keep an ``Experiment``'s records in step with Lightning: ``trainer.callback_metrics``
    appended to ``metrics.jsonl`` every ``log_every`` steps, records pushed to the store at each
    epoch end, and the experiment finished (``failed`` on an exception) at the end of fit."""

    def __init__(
        self,
        experiment: Any,
        *,
        log_every: int = 1,
        finish: bool = True,
        end_timeout: float | None = 60.0,
    ) -> None:
        if log_every < 1:
            raise ConfigError("log_every must be at least 1")
        self.experiment = experiment
        self.log_every = log_every
        self.finish = finish
        self.end_timeout = end_timeout

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        hparams = dict(getattr(pl_module, "hparams", {}) or {})
        if hparams and trainer.is_global_zero:
            self.experiment.save_results({"hyperparameters": hparams}, separate_files=True)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero or trainer.global_step % self.log_every:
            return
        for key, value in trainer.callback_metrics.items():
            if getattr(value, "numel", lambda: 1)() == 1:
                self.experiment.log_scalar(key, value, step=trainer.global_step)
        self.experiment.flush()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero:
            self.experiment.sync(timeout=0)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        if self.finish:
            self.experiment.finish(timeout=self.end_timeout)
        else:
            self.experiment.sync(timeout=self.end_timeout)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if trainer.is_global_zero and self.finish:
            log.error("training failed", exc_info=exception)
            self.experiment.finish("failed", timeout=self.end_timeout)


__all__ = ["CkptdCheckpointIO", "CkptdExperimentCallback", "read_stub"]
