"""The training-process side: ``Checkpointer``, ``SaveHandle`` and ``attach``.

``save()`` does three things on the loop's time: plan the files (raises on non-plain data before
anything is staged), copy tensors into a free arena slot, and hand a small message to the daemon.
It never serializes to disk and never touches the network. On CUDA the copy itself runs on a side
stream and the next ``optimizer.step`` waits for it on the GPU (see ``stager``).
"""

from __future__ import annotations

import contextlib
import enum
import gc
import itertools
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .arena import Arena, Slot
from .connection import Connection
from .ddp import rank_and_world
from .defaults import default_socket
from .errors import CkptdError, ConfigError, DaemonUnavailableError, ProtocolError, SaveError
from .fmt import PlanCache, SavePlan, plan_save
from .names import check_name, make_tag, named
from .protocol import (
    Committed,
    ErrorEvent,
    Event,
    Failed,
    HelloRequest,
    Preempted,
    Released,
    Request,
    SaveFile,
    SaveRequest,
    SlotRequest,
    StatusRequest,
    Uploaded,
    Welcome,
)
from .stager import Fence, Stager
from .unchanged import StableKeys, Unchanged

log = logging.getLogger("ckptd.client")


def _check_metrics(metrics: Any) -> dict[str, float] | None:
    if metrics is None:
        return None
    if not isinstance(metrics, dict):
        raise ConfigError(
            f"metrics must be a dict of names to numbers, not {type(metrics).__name__}"
        )
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"metrics must map names to numbers; {k!r}: {v!r} is not")
        out[k] = float(v)
    return out


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Planning allocates thousands of small objects; a cyclic GC pass in the middle of it
    walks the whole training process's heap and can cost more than the copy."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class Backpressure(enum.StrEnum):
    BLOCK = "block"  # wait for a free slot (default: never lose a save)
    SKIP = "skip"  # drop this save, count it and log it


class SaveHandle:
    """The future of one save. ``wait()`` blocks; ``check()`` and ``done()`` never do."""

    _ORDER = {"staged": 0, "committed": 1, "uploaded": 2}

    def __init__(
        self, tag: str, step: int, skipped: bool = False, saved_by: int | None = None
    ) -> None:
        self.tag = tag
        self.step = step
        self.skipped = skipped
        self.saved_by = saved_by  # in a DDP job, the rank that saves when this one does not
        self.path: str | None = None
        self.files: dict[str, Any] = {}  # name -> {size, crc32c}, as the daemon wrote them
        self._state = "staged"
        self._error: BaseException | None = None
        self._reported = False  # its failure was raised to the caller once
        self._cv = threading.Condition()

    @property
    def state(self) -> str:
        if self.saved_by is not None:
            return "other-rank"
        return "failed" if self._error is not None else ("skipped" if self.skipped else self._state)

    @property
    def error(self) -> BaseException | None:
        """The background failure, if any (``check()`` raises it)."""
        return self._error

    def _advance(self, state: str, path: str | None = None) -> None:
        with self._cv:
            if self._ORDER[state] > self._ORDER[self._state]:
                self._state = state
            if path:
                self.path = path
            self._cv.notify_all()

    def _fail(self, error: BaseException) -> None:
        with self._cv:
            if self._error is None and self._state != "uploaded":
                self._error = error
            self._cv.notify_all()

    def done(self) -> bool:
        """True once the save is uploaded (or committed to a root that is the store), failed,
        or skipped."""
        return (
            self.skipped
            or self.saved_by is not None
            or self._error is not None
            or self._state == "uploaded"
        )

    def check(self) -> None:
        """Re-raise a background failure, without blocking."""
        if self._error is not None:
            self._reported = True
            raise self._error

    def wait(self, until: str = "committed", timeout: float | None = None) -> SaveHandle:
        """Block until the save reached ``until`` ("committed" or "uploaded"); raise its failure."""
        if until not in ("committed", "uploaded"):
            raise ConfigError(f"until must be 'committed' or 'uploaded', not {until!r}")
        if self.saved_by is not None:
            return self  # another rank saves this step; nothing to wait for here
        if self.skipped:
            raise SaveError(
                f"save {self.tag} was skipped: every staging slot was busy (backpressure='skip'); "
                "it will never be committed"
            )
        want = self._ORDER[until]
        with self._cv:
            ok = self._cv.wait_for(
                lambda: self._error is not None or self._ORDER[self._state] >= want, timeout
            )
        self.check()
        if not ok:
            raise TimeoutError(f"save {self.tag} not {until} after {timeout} s (now {self.state})")
        return self

    def __repr__(self) -> str:
        return f"SaveHandle(tag={self.tag!r}, state={self.state!r})"


class Checkpointer:
    """Connect to the node's daemon and save into run ``run``.

    Args:
        run: run name; checkpoints go to ``<store>/<run>/checkpoints/<tag>/``.
        store: store URL for this run (``s3://``, ``gs://``, a path); default: the daemon's.
        socket: the daemon's socket; default ``$CKPTD_SOCKET`` or the per-user default.
        slots: staging buffers; with 2, one save can be written while the next is staged.
        backpressure: ``"block"`` (wait for a free slot) or ``"skip"`` (drop and count the save).
        on_preempt: called once (from a background thread) when the daemon reports a preemption
            notice; ``preempted`` becomes True either way.
        save_rank: in a data-parallel job (``torch.distributed`` initialized), the one rank that
            saves; ``save()`` on the others returns at once (no collective, no waiting) and they
            connect to the daemon only if they restore by themselves. None: every rank saves
            (each rank then needs its own ``run``, e.g. model-parallel state per rank).
        dedup: store bytes that did not change once per run (incremental checkpoints): a
            module's frozen parameters go to ``<model>.frozen.safetensors``, and the daemon
            links, rather than writes and uploads, any file whose content (BLAKE3) the run
            stored already. False: one weights file per model, every file written each time.
        skip_unchanged: do not even copy into shared memory a file whose tensors kept their
            storage and version counter since its last save (``ckptd.unchanged``). Exact for
            writes through PyTorch, not for writes that bypass the version counter
            (``tensor.data``, NumPy views, custom kernels): hence off by default.
    """

    def __init__(
        self,
        run: str,
        store: str | None = None,
        socket: str | None = None,
        *,
        slots: int = 2,
        backpressure: str | Backpressure = Backpressure.BLOCK,
        on_preempt: Callable[[], None] | None = None,
        timeout: float = 10.0,
        save_rank: int | None = 0,
        dedup: bool = True,
        skip_unchanged: bool = False,
    ) -> None:
        self.run = check_name(run, "run")
        if skip_unchanged and not dedup:
            raise ConfigError("skip_unchanged needs dedup (it refers to data stored once)")
        self.dedup = dedup
        # Tracking what did not change costs ~1 us a tensor per save: only where it saves copies.
        self._unchanged = Unchanged(skip_unchanged) if skip_unchanged else None
        self._stable = StableKeys() if dedup else None
        try:
            self.backpressure = Backpressure(backpressure)
        except ValueError:
            raise ConfigError(
                f"backpressure must be 'block' or 'skip', not {backpressure!r}"
            ) from None
        if slots < 1:
            raise ConfigError("slots must be at least 1")
        self.store = store
        self.socket_path = socket or default_socket()
        self.on_preempt = on_preempt
        self.preempted = False
        self.skipped = 0
        self._timeout = timeout
        self._arena = Arena(slots, f"{os.getpid()}")
        self._stager = Stager()
        self._plans = PlanCache()
        self._handles: dict[int, tuple[SaveHandle, int]] = {}  # id -> (handle, slot index)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._fence: Fence | None = None
        self._hooked: set[int] = set()
        self._sender: queue.Queue[tuple[Fence, SaveRequest, SaveHandle] | None] = queue.Queue()
        self._sender_thread: threading.Thread | None = None
        self._closed = False
        self._closing = False
        self.git_commit: str | None = None  # set by Experiment from git.json
        self._conn: Connection | None = None
        self.daemon_info: dict[str, Any] = {}
        """The daemon's ``welcome`` as a map: ``root``, ``store``, ``features`` ..."""
        self.rank, self.world_size = rank_and_world()
        if save_rank is not None and not 0 <= save_rank < self.world_size:
            raise ConfigError(
                f"save_rank {save_rank} is not a rank of this world of {self.world_size}"
            )
        self.save_rank = save_rank
        self._told_other_rank = False
        self._unreported: list[SaveHandle] = []  # failed before commit, not raised anywhere yet
        self.resumed_step: int | None = None
        """The step of the checkpoint ``restore`` loaded, None before (or for a new run)."""
        if self.saves:
            self._connect()

    @property
    def arena(self) -> Arena:
        """The staging slots; ``ckptd.dcp`` stages into them too."""
        return self._arena

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def saves(self) -> bool:
        """Whether this process saves (every process outside DDP; ``save_rank`` within)."""
        return self.save_rank is None or self.rank == self.save_rank

    # ---- connection --------------------------------------------------------------------------

    def _connect(self) -> None:
        conn = Connection(self.socket_path, self._timeout, self._on_event, self._on_disconnect)
        self._conn = conn
        self._sent_slots: set[tuple[int, int]] = set()
        hello = HelloRequest(pid=os.getpid(), run=self.run, store=self.store)
        try:
            reply = conn.request(hello, timeout=self._timeout)
        except ProtocolError as e:
            conn.close()
            raise DaemonUnavailableError(f"unexpected answer from {self.socket_path}: {e}") from e
        if isinstance(reply, ErrorEvent):
            conn.close()
            raise SaveError(f"the daemon refused this client: {reply.error}")
        if not isinstance(reply, Welcome):
            raise DaemonUnavailableError(f"unexpected answer from {self.socket_path}: {reply}")
        self.daemon_info = reply.to_wire()
        if reply.preempted:
            self._preempt()

    def _ensure_connected(self) -> Connection:
        if self._conn is None or not self._conn.alive:
            if self._conn is not None:
                log.warning("reconnecting to the ckptd daemon at %s", self.socket_path)
            self._connect()
        assert self._conn is not None
        return self._conn

    def request(self, msg: Request, timeout: float | None = 30.0) -> Event:
        """Send one request to the daemon (connecting first if needed) and return its reply.

        For the package's own ops beyond saves (``commit`` from ``ckptd.dcp``, ``mirror`` from
        ``Experiment``); ``timeout=None`` waits until the reply or the end of the connection.
        """
        return self._ensure_connected().request(msg, timeout=timeout)

    def _on_disconnect(self) -> None:
        if self._unchanged is not None:
            self._unchanged.failed(-1)  # another daemon may come: refer to nothing it may lack
        with self._lock:
            pending = list(self._handles.items())
            self._handles.clear()
        if self._closing:  # close() waited for every save to be committed: the daemon owns them
            return
        for _, (handle, index) in pending:
            if handle._state == "staged":
                handle._fail(
                    DaemonUnavailableError(
                        f"the daemon at {self.socket_path} went away before {handle.tag} was committed"
                    )
                )
            else:
                # Committed: the daemon's disk owns it now; a restarted daemon resumes the upload.
                handle._fail(
                    DaemonUnavailableError(
                        f"the daemon went away after committing {handle.tag}; its upload resumes "
                        "when the daemon restarts"
                    )
                )
            self._arena.release(index)

    def _on_event(self, ev: Event) -> None:
        if isinstance(ev, Preempted):
            self._preempt()
            return
        sid = getattr(ev, "id", None)
        with self._lock:
            entry = self._handles.get(sid) if isinstance(sid, int) else None
        if entry is None:
            if isinstance(ev, ErrorEvent):
                log.error("the daemon refused a message: %s", ev.error)
            return
        handle, index = entry
        if isinstance(ev, Released):
            self._arena.release(index)
        elif isinstance(ev, Committed):
            if ev.files is not None:
                handle.files = ev.files
            if self._unchanged is not None:
                self._unchanged.committed(sid, ev.blobs)
            handle._advance("committed", ev.path)
        elif isinstance(ev, Uploaded):
            handle._advance("uploaded")
            with self._lock:
                self._handles.pop(sid, None)
        elif isinstance(ev, Failed):
            if self._unchanged is not None:
                self._unchanged.failed(sid)
            error = SaveError(ev.error)
            if handle._state == "staged":  # never committed: the loop must hear of it
                with self._lock:
                    self._unreported.append(handle)
            handle._fail(error)
            self._arena.release(index)
            with self._lock:
                self._handles.pop(sid, None)

    def _preempt(self) -> None:
        if self.preempted:
            return
        self.preempted = True
        log.warning("preemption notice: the machine is going away; save now if you can")
        if self.on_preempt is not None:
            try:
                self.on_preempt()
            except Exception:
                log.exception("on_preempt callback failed")

    # ---- save ----------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        model: Any = None,
        optimizer: Any = None,
        models: dict[str, Any] | None = None,
        optimizers: dict[str, Any] | None = None,
        extra: Any = None,
        tag: str | None = None,
        save_optim: bool = True,
        epoch: int | None = None,
        sample: int | None = None,
        metrics: dict[str, float] | None = None,
    ) -> SaveHandle:
        """Stage a checkpoint and return at once; the daemon commits and uploads it.

        Raises the failure of an earlier save that could not be committed (its tag exists, the
        daemon refused it) if nothing has reported it yet, so the loop hears of it in time.
        ``metrics`` (names to numbers, e.g. ``{"val_loss": 0.31}``) go into the manifest, for
        keep-best retention and for the meta that ``restore`` returns.
        """
        if self._closed:
            raise ConfigError("this Checkpointer is closed")
        self.check()
        metrics = _check_metrics(metrics)
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ConfigError(f"step must be a non-negative int, not {step!r}")
        tag = check_name(tag, "tag") if tag is not None else make_tag(step, epoch, sample)
        if not self.saves:
            assert self.save_rank is not None
            if not self._told_other_rank:
                self._told_other_rank = True
                log.info("rank %d does not save: rank %d saves for the job (save_rank=None saves "
                         "on every rank)", self.rank, self.save_rank)  # fmt: skip
            return SaveHandle(tag, step, saved_by=self.save_rank)
        all_models, all_optims = named(model, models), named(optimizer, optimizers)
        for name in (*all_models, *all_optims):
            check_name(name, "model name")
        if not all_models and not all_optims and extra is None:
            raise ConfigError("nothing to save: pass model=, models=, optimizer= or extra=")
        self._wait_fence()  # a previous async copy must land before its slot is reused
        with _gc_paused():
            stable = self._stable.update(all_models) if self._stable is not None else None
            plan = plan_save(all_models, all_optims if save_optim else {}, extra, self._plans,
                             dedup=self.dedup, stable=stable)  # fmt: skip
            snaps = self._unchanged.mark(plan) if self._unchanged is not None else None
        for opt in all_optims.values():
            if save_optim and isinstance(opt, torch.optim.Optimizer):
                self._hook(opt)
        conn = self._ensure_connected()
        slot = self._arena.acquire(block=self.backpressure is Backpressure.BLOCK)
        if slot is None:
            self.skipped += 1
            log.warning(
                "all %d staging slots busy: skipped save %s (%d skipped so far)",
                len(self._arena.slots),
                tag,
                self.skipped,
            )
            return SaveHandle(tag, step, skipped=True)
        try:
            grew = self._send_slot(conn, slot, plan)
            with _gc_paused():
                fence = self._stager.stage(plan, slot) if plan.files else Fence()
        except BaseException:
            self._arena.release(slot.index)
            raise
        if grew:
            self._prepare_other_slots(plan)
        sid = next(self._ids)
        handle = SaveHandle(tag, step)
        msg = self._request(sid, step, tag, plan, slot, epoch, sample, metrics)
        if snaps is not None and self._unchanged is not None:
            self._unchanged.staged(sid, snaps)
        with self._lock:
            self._handles[sid] = (handle, slot.index)
        if fence.is_async:
            self._fence = fence
            self._start_sender()
            self._sender.put((fence, msg, handle))
        else:
            self._send_save(msg, handle, slot.index)
        return handle

    def save_part(
        self,
        tag: str,
        step: int,
        slot: Slot,
        name: str,
        header: bytes,
        segments: list[tuple[int, int]],
    ) -> SaveHandle:
        """Hand one staged file of a sharded checkpoint to the daemon (for ``ckptd.dcp``).

        The data section is gathered from ``segments`` of ``slot`` (taken from ``arena``); the
        slot is released when the daemon has written it. The part stays invisible until a
        ``commit`` lists it.
        """
        conn = self._ensure_connected()
        self._send_fd(conn, slot)
        sid = next(self._ids)
        handle = SaveHandle(tag, step)
        part = SaveFile(
            name=name,
            header=header,
            offset=segments[0][0] if segments else 0,
            size=sum(n for _, n in segments),
            segments=[list(seg) for seg in segments],
        )
        msg = self._save_request(sid, tag, step, slot, [part], part=True)
        with self._lock:
            self._handles[sid] = (handle, slot.index)
        self._send_save(msg, handle, slot.index)
        return handle

    def _send_fd(self, conn: Connection, slot: Slot) -> None:
        key = (slot.index, slot.generation)
        if key not in self._sent_slots:
            msg = SlotRequest(slot=slot.index, size=slot.size, generation=slot.generation)
            conn.send(msg, fd=slot.fd)
            self._sent_slots.add(key)

    def _send_slot(self, conn: Connection, slot: Slot, plan: SavePlan) -> bool:
        """Make the slot big enough and make sure the daemon has its descriptor."""
        # Whether to pin is asked only when the slot must grow: not a tensor walk per save.
        grew = not slot.fits(plan.arena_size) and slot.ensure(plan.arena_size, self._pin(plan))
        if plan.files:
            self._send_fd(conn, slot)
        return grew

    @staticmethod
    def _pin(plan: SavePlan) -> bool:
        return torch.cuda.is_available() and any(t.is_cuda for f in plan.files for t in f.srcs)

    def _prepare_other_slots(self, plan: SavePlan) -> None:
        """Grow the other free slots in the background, so the next save does not pay for it."""
        size, pin = plan.arena_size, self._pin(plan)

        def grow() -> None:
            held = []
            while (slot := self._arena.acquire(block=False)) is not None:
                held.append(slot)
            try:
                for slot in held:
                    slot.ensure(size, pin=pin)
            finally:
                for slot in held:
                    self._arena.release(slot.index)

        threading.Thread(target=grow, name="ckptd-arena", daemon=True).start()

    def _request(
        self,
        sid: int,
        step: int,
        tag: str,
        plan: SavePlan,
        slot: Slot,
        epoch: int | None,
        sample: int | None,
        metrics: dict[str, float] | None,
    ) -> SaveRequest:
        files = [
            SaveFile(
                name=f.name,
                header=f.header,
                offset=f.arena_offset,
                size=f.data_size,
                dedup=f.dedup,
                blob=f.reuse,
            )
            for f in plan.files
        ]
        manifest: dict[str, Any] = {
            "training_iteration": {"epoch": epoch, "update": step, "sample": sample},
            "model_config": plan.model_config,
            "torch_version": torch.__version__,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **({"git_commit": self.git_commit} if self.git_commit else {}),
            **({"metrics": metrics} if metrics else {}),
        }
        return self._save_request(
            sid, tag, step, slot, files, inline=plan.inline, manifest=manifest
        )

    def _save_request(
        self, sid: int, tag: str, step: int, slot: Slot, files: list[SaveFile], **kw: Any
    ) -> SaveRequest:
        """One ``save`` message, whole checkpoint or (``part=True``) one rank's part."""
        return SaveRequest(
            id=sid, run=self.run, tag=tag, step=step, store=self.store, slot=slot.index,
            generation=slot.generation, files=files, **kw,
        )  # fmt: skip

    def _send_save(self, msg: SaveRequest, handle: SaveHandle, index: int) -> None:
        try:
            self._ensure_connected().send(msg)
        except DaemonUnavailableError as e:
            with self._lock:
                self._handles.pop(msg.id, None)
            self._arena.release(index)
            handle._fail(e)
            raise

    def _start_sender(self) -> None:
        if self._sender_thread is None:
            self._sender_thread = threading.Thread(
                target=self._send_loop, name="ckptd-sender", daemon=True
            )
            self._sender_thread.start()

    def _send_loop(self) -> None:
        while (item := self._sender.get()) is not None:
            fence, msg, handle = item
            try:
                fence.synchronize()
                with self._lock:
                    index = self._handles.get(msg.id, (None, -1))[1]
                self._send_save(msg, handle, index)
            except DaemonUnavailableError as e:
                log.error("could not hand save %s to the daemon: %s", handle.tag, e)
            finally:
                self._sender.task_done()

    def _hook(self, optimizer: torch.optim.Optimizer) -> None:
        """The step fence: the next optimizer.step waits (on the GPU) for the staging copy."""
        if id(optimizer) in self._hooked:
            return
        self._hooked.add(id(optimizer))

        def pre_step(opt: Any, args: Any, kwargs: Any) -> None:
            fence = self._fence
            if fence is not None:
                fence.gpu_wait()

        optimizer.register_step_pre_hook(pre_step)

    def _wait_fence(self) -> None:
        fence, self._fence = self._fence, None
        if fence is not None:
            fence.synchronize()

    # ---- restore and close -------------------------------------------------------------------

    def restore(
        self,
        model: Any = None,
        optimizer: Any = None,
        tag: str = "latest",
        *,
        models: dict[str, Any] | None = None,
        optimizers: dict[str, Any] | None = None,
        strict: bool = True,
        map_location: str | torch.device | None = None,
        broadcast: bool = True,
    ) -> dict[str, Any] | None:
        """Load the newest complete checkpoint (or ``tag``) into the given objects.

        Looks in the daemon's local root first, then in the run's store. Returns the checkpoint's
        meta (manifest fields and ``extra``), or None when the run has no checkpoint yet.

        In a DDP job this is collective: with ``broadcast`` (default) ``save_rank`` reads the
        checkpoint and sends the model and optimizer state to every rank; without it every rank
        reads it itself (from its node's daemon root or the store).
        """
        kwargs: dict[str, Any] = dict(
            tag=tag, model=model, optimizer=optimizer, models=models, optimizers=optimizers,
            strict=strict, map_location=map_location,
        )  # fmt: skip
        if self.world_size == 1 or not broadcast or self.save_rank is None:
            return self._resumed(self._restore_here(**kwargs))
        from .ddp import broadcast_restored

        meta: dict[str, Any] | None = None
        failure: CkptdError | None = None
        if self.saves:
            try:
                meta = self._restore_here(**kwargs)
            except CkptdError as e:  # the other ranks must hear of it, not wait forever
                failure, meta = e, {"__ckptd_error__": f"{type(e).__name__}: {e}"}
        all_models, all_optims = named(model, models), named(optimizer, optimizers)
        meta = broadcast_restored(self.save_rank, meta, all_models, all_optims)
        if failure is not None:
            raise failure
        return self._resumed(meta)

    def _resumed(self, meta: dict[str, Any] | None) -> dict[str, Any] | None:
        """The one resume contract's meta: ``step``, ``epoch`` and ``sample`` at the top (and
        ``metrics`` where the save recorded them), whatever the manifest nests them in."""
        if meta is None:
            return None
        progress = meta.get("training_iteration")
        progress = progress if isinstance(progress, dict) else {}
        for key in ("epoch", "sample"):
            if meta.get(key) is None and progress.get(key) is not None:
                meta[key] = progress[key]
        if isinstance(step := meta.get("step"), int):
            self.resumed_step = step
        return meta

    def _restore_here(self, **kwargs: Any) -> dict[str, Any] | None:
        from .reader import restore_into

        self._ensure_connected()  # where the daemon's root and store are
        urls = [os.path.join(self.daemon_info.get("root") or "", self.run)]
        store = self.store or self.daemon_info.get("store")
        if store:
            from .storage import join_key

            urls.append(
                join_key(store, self.run) if "://" in store else os.path.join(store, self.run)
            )
        return restore_into(urls, **kwargs)

    def check(self) -> None:
        """Raise the failure of an earlier save that was never committed and that no
        ``wait()``/``check()`` of its handle has raised yet. Never blocks."""
        with self._lock:
            pending = [h for h in self._unreported if not h._reported]
            self._unreported.clear()
        if pending:
            first = pending[0]
            first._reported = True
            more = f" (and {len(pending) - 1} later save(s))" if len(pending) > 1 else ""
            raise SaveError(f"save {first.tag} failed{more}: {first._error}") from first._error

    def status(self) -> dict[str, Any]:
        """The daemon's ``status`` reply as a map (what ``ckptd status --json`` prints)."""
        return self.request(StatusRequest()).to_wire()

    def flush(self, until: str = "committed", timeout: float | None = None) -> None:
        """Block until every save so far reached ``until``."""
        self._wait_fence()
        if self._sender_thread is not None:
            self._sender.join()
        with self._lock:
            handles = [h for h, _ in self._handles.values()]
        deadline = None if timeout is None else time.monotonic() + timeout
        for h in handles:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            h.wait(until, left)

    def close(self) -> None:
        """Return when the daemon holds everything saved (committed on its disk). Idempotent."""
        if self._closed:
            return
        try:
            self.flush("committed")
            self.check()
        finally:
            self._closed = True
            self._closing = True
            if self._sender_thread is not None:
                self._sender.put(None)
                self._sender_thread.join(timeout=5)
            if self._conn is not None:
                self._conn.close()
            self._arena.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    every: int,
    run: str,
    store: str | None = None,
    *,
    socket: str | None = None,
    extra: Callable[[], Any] | None = None,
    **kwargs: Any,
) -> Checkpointer:
    """The zero-line form: save ``model`` and ``optimizer`` every ``every`` optimizer steps.

    Uses an optimizer step post-hook, so the training loop needs no change. Steps count from the
    checkpoint that ``restore()`` of the returned Checkpointer loaded. ``extra``, if given, is
    called at each save for plain data to store beside (e.g. scheduler and RNG states). Returns the
    ``Checkpointer``; call ``close()`` at the end (or use it as a context manager).
    """
    if not isinstance(every, int) or every < 1:
        raise ConfigError(f"every must be a positive int, not {every!r}")
    ckpt = Checkpointer(run, store=store, socket=socket, **kwargs)
    done = {"steps": 0, "base": None}

    def post_step(opt: Any, args: Any, kw: Any) -> None:
        # Steps count on from the checkpoint that restore() loaded, so a resumed run saves
        # step-(resumed+every), not step-(every) again (which exists and would collide).
        if done["base"] != ckpt.resumed_step:
            done["base"] = ckpt.resumed_step
            done["steps"] = ckpt.resumed_step or 0
        done["steps"] += 1
        n = done["steps"]
        if n % every == 0 and not ckpt.closed:
            ckpt.save(n, model=model, optimizer=optimizer, extra=extra() if extra else None)

    ckpt._attach_handle = optimizer.register_step_post_hook(post_step)  # type: ignore[attr-defined]
    return ckpt
