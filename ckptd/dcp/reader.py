"""The DCP ``StorageReader``: reads sharded checkpoints from the daemon's root or the store,
verifying every file it reads; DCP's non-tensor values only through the restricted unpickler."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
)
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ..catalog import Located, candidates, run_sync
from ..errors import ConfigError, IntegrityError, NotFoundError, SerializationError
from ..names import check_name
from ..protocol import HelloRequest, Welcome
from ..reader import file_tensors, read_tensors
from ..storage import join_key, open_store
from .layout import BYTES_KEY, METADATA, Loc, decode_metadata
from .writer import Writer

log = logging.getLogger("ckptd.dcp")
_BATCH_BYTES = 128 << 20  # a plan's files read at once (a few small ones overlap their latency)

SAFE_GLOBALS: tuple[Any, ...] = (io.BytesIO, frozenset, range, slice)
"""What the restricted loader allows beyond ``torch.load(weights_only=True)``'s own set (which
has the primitives, dict/list/tuple/set, OrderedDict, tensors, ``torch.Size``, dtypes, devices).
``io.BytesIO`` because DCP saves a BytesIO value (its usual way to carry bytes) by pickling the
object itself; the others are builtins without code. Nothing here can run code when loaded."""


# ---- the reader ------------------------------------------------------------------------------


class Reader(StorageReader):
    """A DCP ``StorageReader`` for checkpoints saved through ``Writer``, resharding included.

    Args:
        run: the run saved into; with ``store``, reads ``<store>/<run>``.
        store: store URL; default: ask this node's daemon for its store, else its root.
        socket: the daemon socket used to find the default store.
        url: instead of run/store, the run's URL directly (``s3://b/p/run``, a path).
        allow_pickle: DCP stores non-tensor values with ``torch.save``; by default they are
            loaded only if ``torch.load(weights_only=True)`` accepts them, with ``SAFE_GLOBALS``
            added (see there): numbers, strings, bytes, containers, tensors, ``torch.Size``,
            dtypes, devices, ``io.BytesIO``. Any other class is refused with a
            ``SerializationError`` naming it. True trusts the checkpoint fully.
        safe_globals: classes or functions to allow on top of those, the narrow opt-in (what
            ``torch.serialization.add_safe_globals`` takes), e.g. ``[MyConfig]``.
        checkpoint_id: the tag when ``dcp.load`` gets none (default: the newest).

    ``checkpoint_id`` in ``dcp.load`` is the tag; None or ``"latest"`` takes the newest
    sharded checkpoint of the run. Every file read is checked against the manifest's CRC32C.
    """

    def __init__(
        self,
        run: str | None = None,
        store: str | None = None,
        socket: str | None = None,
        *,
        url: str | None = None,
        allow_pickle: bool = False,
        safe_globals: Sequence[Any] = (),
        checkpoint_id: str | None = None,
    ) -> None:
        super().__init__()
        if url is None:
            if run is None:
                raise ConfigError("Reader needs run= (with store= or a daemon) or url=")
            check_name(run, "run")
            base = store or _daemon_store(socket)
            url = join_key(base, run) if "://" in base else os.path.join(base, run)
        self.url = url.rstrip("/")
        self.default_tag = "latest" if checkpoint_id is None else check_name(checkpoint_id, "tag")
        self.tag = self.default_tag
        self.allow_pickle = allow_pickle
        self.safe_globals = [*SAFE_GLOBALS, *safe_globals]
        self.manifest: dict[str, Any] = {}
        self._storage: dict[MetadataIndex, Loc] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.tag = self.default_tag if checkpoint_id is None else os.fspath(checkpoint_id)
        if self.tag != "latest":
            check_name(self.tag, "checkpoint_id")

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return Writer.validate_checkpoint_id(checkpoint_id)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        async def go() -> dict[str, Any]:
            async with open_store(self.url) as store:
                # Validated manifests only (``ckptd.manifest``); a missing tag lists those there.
                found = await candidates(store, self.tag)
                if self.tag == "latest":
                    found = [m for m in found if m.get("kind") == "dcp"]
                    if not found:
                        raise NotFoundError(f"no committed sharded checkpoint in {self.url}")
                return found[0]

        manifest = run_sync(go())
        if manifest.get("kind") != "dcp":
            raise ConfigError(
                f"{self.url}@{manifest['tag']} was saved by Checkpointer, not DCP: load it with "
                "ckptd.load or Checkpointer.restore"
            )
        self.manifest = manifest
        self.tag = manifest["tag"]
        raw = self._verified([METADATA])[METADATA].numpy().tobytes()
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise IntegrityError(f"{self.url}@{self.tag}: {METADATA} is not JSON: {e}") from e
        try:
            md = decode_metadata(doc)
        except IntegrityError as e:
            raise IntegrityError(f"{self.url}@{self.tag}: {e}") from e
        self._storage = md.storage_data
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:  # fmt: skip
        self._storage = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        try:
            self._read_data(plan, planner)
        except IntegrityError as e:
            raise IntegrityError(f"{self.url}@{self.tag}: {e}") from e
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read_data(self, plan: LoadPlan, planner: LoadPlanner) -> None:
        locs = [self._loc(item) for item in plan.items]
        order = sorted(range(len(locs)), key=lambda i: locs[i].file)  # file by file
        sizes = {n: int(r.get("size", 0)) for n, r in self.manifest.get("files", {}).items()}
        files = _FilesInTurn(self._verified, [locs[i].file for i in order], sizes)
        blobs: dict[str, dict[str, Any]] = {}
        for item, loc in ((plan.items[i], locs[i]) for i in order):
            tensors, meta = files[loc.file]
            if item.type == LoadItemType.BYTE_IO:
                if loc.file not in blobs:
                    blobs[loc.file] = _blobs(loc.file, meta)
                planner.load_bytes(item, io.BytesIO(self._safe_bytes(loc, blobs[loc.file])))
                continue
            stored = tensors.get(loc.key)
            if stored is None:
                raise IntegrityError(f"{loc.file} has no tensor {loc.key!r}")
            try:
                src = narrow_tensor_by_index(stored, item.storage_offsets, item.lengths)
            except (IndexError, RuntimeError, ValueError) as e:
                raise IntegrityError(
                    f"{loc.file}: tensor {loc.key!r} does not hold the chunk the metadata "
                    f"places in it: {e}"
                ) from e
            target = planner.resolve_tensor(item).detach()
            if target.size() != src.size():
                raise IntegrityError(
                    f"{loc.key}: stored chunk {tuple(src.size())} does not fit {tuple(target.size())}"
                )
            target.copy_(src)
            planner.commit_tensor(item, target)

    def _loc(self, item: Any) -> Loc:
        try:
            return self._storage[item.storage_index]
        except KeyError:
            raise IntegrityError(
                f"{METADATA} does not say where {item.storage_index.fqn!r} is stored"
            ) from None

    def _safe_bytes(self, loc: Loc, blobs: dict[str, Any]) -> bytes:
        """A non-tensor value's bytes for the planner, which ``torch.load``s them with
        ``weights_only=False``. Unless ``allow_pickle``, the stored bytes are unpickled once,
        by the restricted unpickler, and the planner gets that object saved again by us: it never
        unpickles what the store holds."""
        try:
            data = base64.b64decode(blobs[loc.key], validate=True)
        except (KeyError, TypeError, ValueError) as e:
            raise IntegrityError(f"{loc.file}: no readable value {loc.key!r}: {e!r}") from e
        if self.allow_pickle:
            return data
        try:
            with torch.serialization.safe_globals(self.safe_globals):
                obj = torch.load(io.BytesIO(data), weights_only=True)
        except Exception as e:  # the weights-only unpickler's refusals have no common type
            why = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), "")
            raise SerializationError(
                f"{loc.key} holds an object that needs full unpickling ({why or type(e).__name__}); "
                "allow its class with Reader(safe_globals=[...]), or pass "
                "Reader(allow_pickle=True) if you trust this checkpoint"
            ) from e
        out = io.BytesIO()
        torch.save(obj, out)
        return out.getvalue()

    def _verified(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Each named file of the checkpoint, whole, checked against the manifest as it is read
        (the same reads as ``ckptd.load``: straight into one buffer per file, by preadv from a
        local copy, never through a symbolic link, or by concurrent ranged GETs)."""
        files = self.manifest.get("files", {})
        for name in names:
            if name not in files:
                raise IntegrityError(f"{name} is not listed in the manifest of {self.tag}")
        loc = Located(self.url, self.tag, {**self.manifest, "files": {n: files[n] for n in names}})
        return read_tensors(loc, names)


class _FilesInTurn:
    """``file -> (tensors, meta)`` for a plan's files, asked for in sorted order: read (and
    verified) a batch of about ``_BATCH_BYTES`` at a time, the previous batch dropped first, so
    a restore holds at most one batch (or one file, if bigger) beside the state it fills."""

    def __init__(
        self,
        read: Callable[[list[str]], dict[str, torch.Tensor]],
        names: list[str],
        sizes: dict[str, int],
    ) -> None:
        self._read = read
        self._batches = iter(_batches(list(dict.fromkeys(names)), sizes, _BATCH_BYTES))
        self._now: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}

    def __getitem__(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        while name not in self._now:
            batch = next(self._batches, None)
            if batch is None:
                raise KeyError(name)
            self._now = {}  # before the next read: the targets hold copies, not views
            self._now = {n: file_tensors(buf, n) for n, buf in self._read(batch).items()}
        return self._now[name]


def _batches(names: list[str], sizes: dict[str, int], budget: int) -> list[list[str]]:
    """``names`` in order, cut into runs of at most ``budget`` bytes (or one bigger file)."""
    out: list[list[str]] = []
    held = budget
    for name in names:
        size = sizes.get(name, 0)
        if not out or held + size > budget:
            out.append([])
            held = 0
        out[-1].append(name)
        held += size
    return out


def _blobs(file: str, meta: dict[str, str]) -> dict[str, Any]:
    """The base64 table of non-tensor values in a shard's metadata."""
    try:
        blobs = json.loads(meta.get(BYTES_KEY, "{}"))
    except (ValueError, RecursionError) as e:
        raise IntegrityError(f"{file}: {BYTES_KEY} is not JSON: {e}") from e
    if not isinstance(blobs, dict):
        raise IntegrityError(f"{file}: {BYTES_KEY} is not an object")
    return blobs


def _daemon_store(socket: str | None) -> str:
    """The default place to read from: the daemon's store, else its root."""
    from ..connection import Connection
    from ..defaults import default_socket

    conn = Connection(socket or default_socket(), 10.0)
    try:
        info = conn.request(HelloRequest(pid=os.getpid()))
    finally:
        conn.close()
    if not isinstance(info, Welcome):
        raise ConfigError(f"the daemon did not welcome this reader: {info}")
    return info.store or info.root
