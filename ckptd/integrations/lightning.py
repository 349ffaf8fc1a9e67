"""PyTorch Lightning: save through the daemon (``CkptdCheckpointIO``) and keep the records.

``Trainer(plugins=[CkptdCheckpointIO(ckpt)])`` makes every Lightning save (``ModelCheckpoint``,
``trainer.save_checkpoint``) a ckptd save: the model's ``state_dict`` as the model, each optimizer
state as ``optimizer{i}``, the rest of Lightning's dict (loops, callbacks, schedulers, hparams) as
plain ``extra``. At Lightning's path it writes a small JSON stub naming the run and tag, so that
Lightning's own bookkeeping (``last.ckpt`` lookup, ``ckpt_path=``, ``save_top_k``) works and
``load_checkpoint`` knows what to fetch. Uses ``lightning.pytorch`` when installed, else
``pytorch_lightning``.

The store follows Lightning's view of its folder: a save at the same step and loop state as the
one just made (``save_last``) is a second stub naming the same tag, not a second upload; a
checkpoint whose last stub Lightning removes (``save_top_k``) or overwrites is deleted from the
store and the daemon's root, once the newer save is uploaded.

Resuming on any machine, from the daemon's root or else the store, no s3fs needed::

    trainer.fit(model, ckpt_path=io.resume_path())

``resume_path()`` is ``"ckptd://latest"`` when the run has a checkpoint, else None (a fresh
start). ``ckpt_path`` also takes ``"ckptd://<tag>"`` and a run URL ``s3://bucket/prefix/run@tag``;
``"last"`` works where the stubs are (this machine, or after one resume recreated them).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from typing import Any

from ..atomic import write_atomic

try:
    import lightning.pytorch as pl
    from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
except ImportError:
    import pytorch_lightning as pl
    from lightning_fabric.plugins import CheckpointIO, TorchCheckpointIO

from ..errors import ConfigError, NotFoundError, SaveError
from ._common import (
    delete_checkpoint,
    existing_tags,
    load_tag,
    newest,
    plain,
    raise_failed,
    run_urls,
    tag_for,
)

log = logging.getLogger("ckptd.lightning")

STUB_FORMAT = "ckptd-stub/1"
SCHEME = "ckptd://"


def read_stub(path: str) -> dict[str, Any] | None:
    """The stub at ``path``, or None when the file is something else (a torch checkpoint)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        stub = json.loads(head)
    except (OSError, ValueError):
        return None
    return stub if isinstance(stub, dict) and stub.get("format") == STUB_FORMAT else None


def _fingerprint(checkpoint: dict[str, Any]) -> str:
    """What tells two saves at one step apart: the loops' progress (same step and loops: same
    weights and optimizer, no step ran in between)."""
    loops = plain(checkpoint.get("loops"))
    return json.dumps(
        [checkpoint.get("global_step"), checkpoint.get("epoch"), loops],
        default=repr,
        sort_keys=True,
    )


class CkptdCheckpointIO(CheckpointIO):
    """Lightning's checkpoint IO through the ckptd daemon.

    Args:
        checkpointer: a ``ckptd.Checkpointer`` (e.g. ``Experiment.checkpointer``).
        wait: ``None`` (return once staged: training goes on while the daemon writes),
            ``"committed"`` or ``"uploaded"``.
        delete_timeout: at teardown, how long to wait for the uploads that store deletions
            wait on; what is left stays in the store (nothing lost, one extra checkpoint).
    """

    def __init__(
        self, checkpointer: Any, *, wait: str | None = None, delete_timeout: float = 60.0
    ) -> None:
        if wait not in (None, "committed", "uploaded"):
            raise ConfigError(f"wait must be None, 'committed' or 'uploaded', not {wait!r}")
        self.checkpointer = checkpointer
        self.wait = wait
        self.delete_timeout = delete_timeout
        self.handles: dict[str, Any] = {}
        self._used: set[str] = set()
        self._stubs: dict[str, str] = {}  # Lightning path -> tag, for every live stub
        self._existing: set[str] | None = None  # tags the run has (listed once)
        self._last: tuple[str, str] | None = None  # (fingerprint, tag) of the newest save
        self._newest: Any = None  # handle of the newest real save: deletions wait on it
        self._deletions: queue.Queue[tuple[str, Any, Any] | None] = queue.Queue()
        self._deleter: threading.Thread | None = None

    # ---- save ----------------------------------------------------------------------------------

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        raise_failed(self.handles.values())  # an earlier failure stops training here
        path = os.fspath(path)
        step = int(checkpoint.get("global_step", 0))
        fingerprint = _fingerprint(checkpoint)
        if self._last is not None and self._last[0] == fingerprint:
            tag = self._last[1]  # save_last right after a top-k save: the same bytes
        else:
            tag = tag_for(path, step, self._used)
            if self._existing is None:
                self._existing = existing_tags(run_urls(self.checkpointer))
            if tag in self._existing:
                raise SaveError(
                    f"checkpoint {tag} already exists in run {self.checkpointer.run}: this fit "
                    "did not resume from the run; pass trainer.fit(model, "
                    "ckpt_path=io.resume_path()), or save into a new run"
                )
            rest = {
                k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")
            }
            optims = checkpoint.get("optimizer_states") or []
            stubs = {**self._stubs, path: tag}
            handle = self.checkpointer.save(
                step,
                model=checkpoint.get("state_dict"),
                optimizers={f"optimizer{i}": sd for i, sd in enumerate(optims)},
                extra={
                    "lightning": plain(rest),
                    "optimizers": len(optims),
                    "ckptd": {"stubs": stubs},
                },
                tag=tag,
                epoch=checkpoint.get("epoch"),
            )
            self.handles = {t: h for t, h in self.handles.items() if not h.done() or h._error}
            self.handles[tag] = handle
            self._existing.add(tag)
            self._newest = handle
            self._last = (fingerprint, tag)
        self._write_stub(path, tag, step)
        if self.wait is not None and tag in self.handles:
            self.handles[tag].wait(self.wait)

    def _write_stub(self, path: str, tag: str, step: int) -> None:
        stub = {
            "format": STUB_FORMAT,
            "run": self.checkpointer.run,
            "tag": tag,
            "step": step,
            "urls": run_urls(self.checkpointer),
        }
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_atomic(path, json.dumps(stub).encode())
        previous = self._stubs.get(path)
        self._stubs[path] = tag
        if previous is not None and previous != tag:
            self._release(previous)  # overwritten, as Lightning overwrites its file

    # ---- load ----------------------------------------------------------------------------------

    def resume_path(self) -> str | None:
        """``ckpt_path`` for ``fit``: ``"ckptd://latest"`` when the run has a checkpoint in the
        daemon's root or the store, None when it has none (so the same line starts it)."""
        self._existing = existing_tags(run_urls(self.checkpointer))
        return f"{SCHEME}latest" if self._existing else None

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        path = os.fspath(path)
        location = map_location if isinstance(map_location, str | None) else "cpu"
        location = location or "cpu"
        urls = run_urls(self.checkpointer)
        if path.startswith(SCHEME):
            state = newest(urls, path[len(SCHEME) :] or "latest", location)
            if state is None:
                raise NotFoundError(
                    f"run {self.checkpointer.run} has no checkpoint in {' or '.join(urls)}; "
                    "ckpt_path=io.resume_path() starts from scratch when there is none"
                )
            self._adopt(state, urls)
        elif "://" in path and not os.path.exists(path):
            from ..catalog import split_tag
            from ..reader import load

            url, tag = split_tag(path)
            state = load(url, tag=tag, map_location=location)  # s3://, gs://: no fsspec
        else:
            stub = read_stub(path)
            if stub is None:
                # Not ours (a checkpoint from before ckptd): Lightning's own loader reads it.
                return TorchCheckpointIO().load_checkpoint(path, map_location, weights_only)
            handle = self.handles.get(stub["tag"])
            if handle is not None and handle.state == "staged":
                handle.wait("committed")  # saved by this process and still being written
            state = load_tag(list(stub["urls"]), stub["tag"], location)
            if stub.get("run") == self.checkpointer.run:
                self._adopt(state, urls)
        extra = state["extra"] or {}
        out = dict(extra.get("lightning") or {})
        out["state_dict"] = state["model"]
        out["optimizer_states"] = [
            state["optimizers"][f"optimizer{i}"] for i in range(int(extra.get("optimizers", 0)))
        ]
        return out

    def _adopt(self, state: dict[str, Any], urls: list[str]) -> None:
        """Take over the run's view from the checkpoint resumed: the tags it has, and the stubs
        Lightning's callbacks will name (recreated where this machine lacks them)."""
        self._existing = existing_tags(urls)
        stubs = ((state.get("extra") or {}).get("ckptd") or {}).get("stubs") or {}
        for path, tag in stubs.items():
            if tag not in self._existing or "://" in path:
                continue
            if read_stub(path) is None or path not in self._stubs:
                try:
                    self._write_stub(path, tag, int(state["meta"].get("step", 0)))
                except OSError as e:
                    log.warning("could not recreate the stub %s: %s", path, e)
        self._used |= self._existing

    # ---- remove ------------------------------------------------------------------------------

    def remove_checkpoint(self, path: Any) -> None:
        """Drop Lightning's stub; the checkpoint goes from the store once no stub names it and
        the newer save is uploaded."""
        path = os.fspath(path)
        stub = read_stub(path)
        tag = self._stubs.pop(path, None) or (stub or {}).get("tag")
        if stub is not None:
            os.unlink(path)
        elif os.path.exists(path):
            TorchCheckpointIO().remove_checkpoint(path)
        if tag is not None:
            self._release(tag)

    def _release(self, tag: str) -> None:
        if tag in self._stubs.values():
            return  # another stub (last.ckpt) still names it
        if self._deleter is None:
            self._deleter = threading.Thread(target=self._delete_loop, name="ckptd-pl-delete",
                                             daemon=True)  # fmt: skip
            self._deleter.start()
        self._deletions.put((tag, self.handles.get(tag), self._newest))

    def _delete_loop(self) -> None:
        while (item := self._deletions.get()) is not None:
            tag, own, gate = item
            try:
                if own is not None and not own.done():
                    own.wait("uploaded", self.delete_timeout)  # never delete mid-upload
                if gate is not None:
                    gate.wait("uploaded", self.delete_timeout)  # the newer one is safe first
                for url in run_urls(self.checkpointer):
                    if delete_checkpoint(url, tag):
                        log.info("deleted %s@%s (no longer kept by Lightning)", url, tag)
            except Exception as e:  # noqa: BLE001 - a failed delete is logged, never fatal
                log.warning("did not delete %s (kept): %s", tag, e)
            finally:
                self._deletions.task_done()

    def wait_deletions(self) -> None:
        """Block until the store deletions asked for so far are done (or given up)."""
        if self._deleter is not None:
            self._deletions.join()

    def live_tags(self) -> dict[str, str]:
        """Lightning path -> tag of every stub this IO keeps (for tests and tools)."""
        return dict(self._stubs)

    def teardown(self) -> None:
        self.wait_deletions()
        raise_failed(self.handles.values())


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
