"""The DCP ``StorageWriter``/``AsyncStager``: each rank copies its shard into a shared-memory
slot (the only work ``dcp.async_save`` blocks on) and hands it to its node's daemon."""

from __future__ import annotations

import base64
import copy
import dataclasses
import io
import json
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
    StorageMeta,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ..catalog import run_sync
from ..client import Checkpointer
from ..ddp import rank_and_world
from ..errors import ConfigError, NotFoundError, SaveError, StorageError
from ..fmt import DTYPES, check_tensor
from ..header import FORMAT, encode_header
from ..names import MANIFEST, check_name
from ..protocol import CommitRequest, Committed, ErrorEvent
from ..stager import copy_all
from ..storage import join_key, open_store
from .errors import CheckpointExistsError
from .layout import (
    BYTES_KEY,
    METADATA,
    TRAILING_INT,
    Loc,
    encode_metadata,
    item_key,
    shard_name,
)

log = logging.getLogger("ckptd.dcp")


# ---- staging: a training-safe copy of the state dict in a shared-memory slot -------------------


def _local(t: Any) -> torch.Tensor:
    # ``_local_tensor`` is what DCP's own stager copies into; ``to_local()`` is an autograd
    # function, ~20x slower per call, and a state has thousands of them.
    local = getattr(t, "_local_tensor", None)
    if isinstance(local, torch.Tensor):
        return local
    return t.to_local() if hasattr(t, "to_local") else t


def _leaves(obj: Any, out: list[Any]) -> list[Any]:
    """Every tensor of a (nested) state dict in a fixed order, DTensors as themselves."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _leaves(v, out)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _leaves(v, out)
    return out


def _staged_leaf(src: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """What the staged state dict holds for ``src``: the view, wrapped like ``src`` if a DTensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(src, DTensor):
        return _staged_dtensor_class()(view, src._spec, requires_grad=False)
    return view


def _rebuild_dtensor(local: torch.Tensor, spec: Any, requires_grad: bool) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return DTensor(local, spec, requires_grad=requires_grad)


_STAGED_DTENSOR: Any = None


def _staged_dtensor_class() -> Any:
    """A DTensor that pickles as (local tensor, spec). DCP's process-mode ``async_save`` pickles
    the staged state for its own process, and torch 2.13 crashes (SIGSEGV in
    ``_share_fd_cpu_``) pickling a DTensor whose local tensor lies at an offset in shared
    memory, which every staged DTensor but the first does. Pickled as a plain tensor, the view
    is shared in place like any other; it unpickles as a plain ``DTensor``."""
    global _STAGED_DTENSOR
    if _STAGED_DTENSOR is None:
        from torch.distributed.tensor import DTensor

        class StagedDTensor(DTensor):
            def __reduce_ex__(self, protocol: Any) -> Any:
                return (_rebuild_dtensor, (self._local_tensor, self._spec, self.requires_grad))

        _STAGED_DTENSOR = StagedDTensor
    return _STAGED_DTENSOR


def _signature(leaves: list[torch.Tensor]) -> tuple[Any, ...]:
    from torch.distributed.tensor import DTensor

    return tuple(
        (t.dtype, tuple(t.shape), id(t.device_mesh), tuple(t.placements), tuple(_local(t).shape))
        if isinstance(t, DTensor)
        else (t.dtype, tuple(t.shape))
        for t in leaves
    )


def _rebuild(obj: Any, staged: Iterator[torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return next(staged)
    if isinstance(obj, dict):
        return {k: _rebuild(v, staged) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        out = [_rebuild(v, staged) for v in obj]
        return out if isinstance(obj, list) else type(obj)(out)  # type: ignore[call-arg]
    return copy.deepcopy(obj)  # plain values: later changes by the loop must not leak in


def _layout(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    """Offsets in a slot, largest elements first, packed without holes: any subset taken in this
    order is again naturally aligned and hole-free, which is what a shard file needs."""
    order = sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())
    offsets = [0] * len(tensors)
    cursor = 0
    for i in order:
        offsets[i] = cursor
        cursor += tensors[i].numel() * tensors[i].element_size()
    return offsets, cursor


def _copy_into(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """CPU sources at once; CUDA ones device-to-host into the pinned slot, then synchronize."""
    cuda = [(d, s) for d, s in zip(dst, src, strict=True) if s.is_cuda]
    cpu = [(d, s if s.is_cpu else s.cpu()) for d, s in zip(dst, src, strict=True) if not s.is_cuda]
    with torch.no_grad():
        if cpu:
            copy_all([d for d, _ in cpu], [s for _, s in cpu])
        for d, s in cuda:
            d.copy_(s, non_blocking=True)
        if cuda:
            torch.cuda.current_stream(cuda[0][1].device).synchronize()


# ---- the writer ------------------------------------------------------------------------------


class Writer(StorageWriter, AsyncStager):
    """A DCP ``StorageWriter`` (and ``AsyncStager``) that saves through the node's ckptd daemon.

    Args:
        run: run name; the checkpoint goes to ``<store>/<run>/checkpoints/<checkpoint_id>/``.
        store: store URL (``s3://``, ``gs://``, a path); default: the daemon's. Ranks on several
            nodes need one that every node's daemon reaches.
        socket: this node's daemon socket; default ``$CKPTD_SOCKET`` or the per-user default.
        step: the training step recorded in the manifest (orders ``latest``); default: the
            trailing number of the checkpoint id (``step-100`` -> 100), else 0.
        timeout: seconds a rank waits for its daemon to commit/upload its part.
        slots: staging slots per rank; with 2, the next ``async_save`` can stage while the last
            one is still being written.
        checkpoint_id: the tag when ``dcp.save`` gets none (DCP's deprecated ``save_state_dict``
            never passes one), like ``FileSystemWriter``'s path.

    With ``dcp.async_save`` the loop blocks only for ``stage()``: the copy of this rank's tensors
    into shared memory. Writing, uploading and the commit run in DCP's background thread.

    Prefer DCP's default thread mode: the daemon already keeps serialization and I/O out of the
    training process. Process mode works too (DTensors included): the staged copy is shared with
    DCP's process in place, that process writes it through its own daemon connection, and the
    slot is released here once DCP's save thread has heard back from it.

    A ``checkpoint_id`` that is already committed is refused before anything is written, with a
    ``CheckpointExistsError`` (an ``AlreadyExistsError`` and a ``RuntimeError``, like
    ``FileSystemWriter(overwrite=False)``'s) whose message starts "Checkpoint already exists";
    DCP raises it wrapped in its ``CheckpointException``. ckptd has no ``overwrite``.
    """

    _synchronize_after_execute = False  # stage() returns a finished copy

    def __init__(
        self,
        run: str,
        store: str | None = None,
        socket: str | None = None,
        *,
        step: int | None = None,
        timeout: float = 3600.0,
        slots: int = 2,
        checkpoint_id: str | None = None,
    ) -> None:
        super().__init__()
        self.run = check_name(run, "run")
        self.store = store
        self.socket = socket
        self.step = step
        self.timeout = timeout
        self.tag = None if checkpoint_id is None else check_name(checkpoint_id, "checkpoint_id")
        self.is_coordinator = False
        self.rank, self.world = rank_and_world()
        self._slots = slots
        self._client: Checkpointer | None = None
        self._layouts: dict[tuple[Any, ...], tuple[list[int], int]] = {}
        self._staged: Any = None  # (slot, base pointer, size) of the last stage()
        # One save in flight per writer: DCP keeps the tag (reset) and the staged state on the
        # writer, so a second async_save stages only once the first is done (see stage()).
        self._idle = threading.Event()
        self._idle.set()

    def __getstate__(self) -> dict[str, Any]:
        # DCP's process-mode async_save sends the writer to its own process: the connection,
        # slots and caches stay here, and that process opens its own. This save's write_data and
        # finish run there, so this side is done once the sending thread (DCP's save thread, which
        # waits for that process's answer) ends: then the staged slot is free again.
        state = self.__dict__.copy()
        state.update(_client=None, _staged=None, _layouts={}, _idle=None)
        if self._staged is not None and self._idle is not None:
            self._hand_off(threading.current_thread())
        return state

    def _hand_off(self, sender: threading.Thread) -> None:
        staged, self._staged = self._staged, None

        def release() -> None:
            sender.join(self.timeout)
            if self._client is not None:
                self._client.arena.release(staged[0].index)
            self._idle.set()

        threading.Thread(target=release, name="ckptd-dcp-handoff", daemon=True).start()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._idle = threading.Event()
        self._idle.set()

    @property
    def client(self) -> Checkpointer:
        if self._client is None:
            self._client = Checkpointer(self.run, store=self.store, socket=self.socket,
                                        slots=self._slots)  # fmt: skip
        return self._client

    # StorageWriter ----------------------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.tag = check_name(os.fspath(checkpoint_id), "checkpoint_id")
        elif self.tag is None:
            raise ConfigError("pass checkpoint_id= to dcp.save/async_save: it is the ckptd tag")

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        try:
            check_name(os.fspath(checkpoint_id), "checkpoint_id")
        except ConfigError:
            return False
        return True

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.tag)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        if isinstance(kwargs.get("rank"), int):
            self.rank = kwargs["rank"]
        else:
            self.rank, self.world = rank_and_world()

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        self._refuse_existing()
        world = len(plans)
        return [dataclasses.replace(p, storage_data=(i, world)) for i, p in enumerate(plans)]

    def _refuse_existing(self) -> None:
        """On the coordinator, before any rank writes: a committed tag is never overwritten, and
        DCP users expect to hear so up front (``FileSystemWriter`` checks in its plan too). The
        daemon refuses again at the commit, so a save racing this one still cannot overwrite."""
        assert self.tag is not None
        info = self.client.daemon_info
        base = self.store or info.get("store") or info.get("root")
        if not base:
            return
        url = join_key(base, self.run) if "://" in base else os.path.join(base, self.run)

        async def exists() -> bool:
            async with open_store(url) as store:
                try:
                    await store.get_bytes(
                        join_key("checkpoints", self.tag, MANIFEST), start=0, end=1
                    )
                except NotFoundError:
                    return False
                return True

        try:
            found = run_sync(exists())
        except (StorageError, OSError) as e:  # e.g. only the daemon holds the store's credentials
            log.debug("cannot look for %s@%s in %s from here (%s); the daemon checks at commit",
                      self.run, self.tag, base, e)  # fmt: skip
            return
        if found:
            raise CheckpointExistsError(
                f"Checkpoint already exists: {self.run}@{self.tag} in {base} is committed and "
                "ckptd never overwrites a checkpoint; save under a new checkpoint_id"
            )

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        fut: Future[list[WriteResult]] = Future()
        try:
            fut.set_result(self._write(plan, planner))
        except BaseException:
            self._release_staged()
            self._idle.set()  # no finish() follows a failed write
            raise
        if not self.is_coordinator:
            self._idle.set()  # this rank's share of the save is done
        return fut

    def _write(self, plan: SavePlan, planner: SavePlanner) -> list[WriteResult]:
        if self.tag is None:
            raise ConfigError("no checkpoint_id: pass one to dcp.save/async_save")
        rank, world = plan.storage_data if plan.storage_data else (self.rank, self.world)
        name = shard_name(rank, world)
        tensors: list[tuple[str, torch.Tensor, Any]] = []
        blobs: dict[str, str] = {}
        for item in plan.items:
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                assert isinstance(data, io.BytesIO)
                blobs[item.index.fqn] = base64.b64encode(data.getvalue()).decode()
                continue
            assert isinstance(data, torch.Tensor) and item.tensor_data is not None
            chunk = item.tensor_data.chunk
            key = item_key(item.index.fqn, chunk.offsets, chunk.sizes, item.tensor_data.size)
            t = data.detach()
            check_tensor(key, t)
            tensors.append((key, t, item))
        if not plan.items:
            self._release_staged()
            return []
        # Largest elements first: aligned and hole-free (see _layout), in the order DCP gave.
        tensors.sort(key=lambda e: -e[1].element_size())
        header: dict[str, Any] = {"__metadata__": {"format": FORMAT, "ckptd.kind": "dcp-shard"}}
        if blobs:
            header["__metadata__"][BYTES_KEY] = json.dumps(blobs, separators=(",", ":"))
        offset = 0
        for key, t, _ in tensors:
            n = t.numel() * t.element_size()
            header[key] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
                           "data_offsets": [offset, offset + n]}  # fmt: skip
            offset += n
        slot, segments = self._place(tensors, offset)
        handle = self.client.save_part(
            self.tag, self._step(), slot, name, encode_header(header), segments
        )
        until = "uploaded"  # the daemon says "uploaded" at once when its root is the store
        handle.wait(until, timeout=self.timeout)
        rec = handle.files.get(name)
        if not isinstance(rec, dict):
            raise SaveError(f"the daemon did not report the size and checksum of {name}")
        results = []
        size, crc, blob = int(rec["size"]), str(rec["crc32c"]), rec.get("blob")
        for key, t, item in tensors:
            loc = Loc(name, key, size, crc, blob)
            results.append(WriteResult(item.index, t.numel() * t.element_size(), loc))
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                loc = Loc(name, item.index.fqn, size, crc, blob)
                results.append(WriteResult(item.index, len(blobs[item.index.fqn]), loc))
        return results

    def _place(self, tensors: list[tuple[str, torch.Tensor, Any]], size: int) -> tuple[Any, Any]:
        """The part's bytes in a slot: gathered in place from what ``stage()`` copied when every
        tensor lies there (async_save), else copied now into a fresh slot (plain dcp.save)."""
        staged, self._staged = self._staged, None
        if staged is not None:
            slot, base, limit = staged
            segments: list[list[int]] = []
            for _, t, _ in tensors:
                n = t.numel() * t.element_size()
                ptr = t.data_ptr() if n else base
                if not (t.is_contiguous() and t.is_cpu and base <= ptr and ptr + n <= base + limit):
                    segments = []
                    break
                if segments and segments[-1][0] + segments[-1][1] == ptr - base:
                    segments[-1][1] += n
                elif n:
                    segments.append([ptr - base, n])
            else:
                return slot, [tuple(s) for s in segments]
            self.client.arena.release(slot.index)
        client = self.client
        slot = client.arena.acquire(block=True)
        assert slot is not None
        try:
            pin = torch.cuda.is_available() and any(t.is_cuda for _, t, _ in tensors)
            slot.ensure(max(size, 1), pin)
            assert slot.buf is not None
            dst, src, cursor = [], [], 0
            for _, t, _ in tensors:
                n = t.numel() * t.element_size()
                if n:
                    dst.append(slot.buf[cursor : cursor + n].view(t.dtype).view(t.shape))
                    src.append(t)
                cursor += n
            _copy_into(dst, src)
        except BaseException:
            client.arena.release(slot.index)
            raise
        return slot, [(0, size)] if size else []

    def _step(self) -> int:
        if self.step is not None:
            return self.step
        m = TRAILING_INT.search(self.tag or "")
        return int(m.group(1)) if m else 0

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """On the coordinator only: the global commit, once every rank's part is confirmed."""
        try:
            self._finish(metadata, results)
        finally:
            self._idle.set()

    def _finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        assert self.tag is not None
        parts: dict[str, dict[str, Any]] = {}
        storage: dict[MetadataIndex, Loc] = {}
        for rank_results in results:
            for r in rank_results:
                loc = r.storage_data
                storage[r.index] = loc
                parts[loc.file] = {"size": loc.size, "crc32c": loc.crc32c}
                if loc.blob is not None:
                    parts[loc.file]["blob"] = loc.blob
        metadata.storage_data = storage
        body = json.dumps(encode_metadata(metadata), separators=(",", ":")).encode()
        step = self._step()
        git = self.client.git_commit
        commit = CommitRequest(
            run=self.run,
            tag=self.tag,
            step=step,
            store=self.store,
            parts=parts,
            inline={METADATA: body},
            manifest={
                "kind": "dcp",
                "world_size": len(results),
                "training_iteration": {"update": step},
                "torch_version": torch.__version__,
                **({"git_commit": git} if git else {}),
            },
        )
        reply = self.client.request(commit, timeout=self.timeout)
        if not isinstance(reply, Committed):
            error = reply.error if isinstance(reply, ErrorEvent) else None
            raise SaveError(error or f"commit of {self.run}@{self.tag} failed: {reply}")
        log.info("committed sharded checkpoint %s@%s (%d parts)", self.run, self.tag, len(parts))

    # AsyncStager ------------------------------------------------------------------------------

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The loop's only blocking work in ``dcp.async_save``: copy this rank's tensors (local
        shards of DTensors) into a shared-memory slot the daemon will write from.

        Waits first for this writer's previous save, if it is still running: DCP keeps the tag
        and the staged state on the writer object, so two saves cannot share one in flight.
        """
        if not self._idle.wait(self.timeout):
            raise SaveError(
                f"the previous save of {self.run}@{self.tag} through this writer is still running "
                f"after {self.timeout} s; wait for its future before the next async_save"
            )
        self._idle.clear()
        try:
            return self._stage(state_dict)
        except BaseException:
            self._idle.set()  # nothing was handed to DCP
            raise

    def _stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        self._release_staged()
        leaves = _leaves(state_dict, [])
        tensors = [_local(t) for t in leaves]
        sig = _signature(leaves)
        cached = self._layouts.get(sig)
        if cached is None:
            for i, t in enumerate(tensors):
                check_tensor(f"tensor #{i} of the state dict", t)
            if len(self._layouts) > 8:
                self._layouts.clear()
            cached = self._layouts[sig] = _layout(tensors)
        offsets, size = cached
        client = self.client
        slot = client.arena.acquire(block=True)
        assert slot is not None
        try:
            pin = torch.cuda.is_available() and any(t.is_cuda for t in tensors)
            if not slot.fits(max(size, 1)):
                slot.ensure(max(size, 1), pin)
            assert slot.buf is not None
            key = ("dcp", sig)
            views = slot.views.get(key)
            if views is None:  # built once per slot and layout: views, and DTensors around them
                plain = [
                    slot.buf[o : o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                    for o, t in zip(offsets, tensors, strict=True)
                ]
                wrapped = [_staged_leaf(src, v) for src, v in zip(leaves, plain, strict=True)]
                nonempty = [i for i, t in enumerate(tensors) if t.numel()]
                views = slot.views[key] = (nonempty, plain + wrapped)
            nonempty, both = views
            n = len(tensors)
            _copy_into([both[i] for i in nonempty], [tensors[i] for i in nonempty])
            staged = _rebuild(state_dict, iter(both[n:]))
        except BaseException:
            client.arena.release(slot.index)
            raise
        self._staged = (slot, slot.buf.data_ptr(), slot.size)
        return staged

    def synchronize_staging(self) -> None:
        """Nothing to wait for: ``stage()`` returns after the copy has landed."""

    def _release_staged(self) -> None:
        staged, self._staged = self._staged, None
        if staged is not None:
            self.client.arena.release(staged[0].index)

    def close(self) -> None:
        """Release the staging memory and the daemon connection (after the last save)."""
        self._release_staged()
        if self._client is not None:
            self._client.close()
            self._client = None
