"""Reading checkpoints back: ``load``, ``verify``, listing, and restoring into live objects.

Readers trust nothing but the manifest: a checkpoint exists iff ``MANIFEST.json`` exists and
every file it lists has the listed size and CRC32C. ``latest`` is only a hint; when it is missing,
stale or names a checkpoint that fails verification, the newest verifying manifest wins.
``restore_into`` and ``load_newest`` look over several locations (the daemon's root and the
store) with ``catalog.open_newest``: the newest checkpoint that verifies in any of them.
Nothing is ever unpickled: tensors come from safetensors data sections, the rest from JSON and
msgpack.

Files are read straight into the memory of what they become (``ckptd.readinto``): one buffer
per file, filled by preadv or concurrent ranged GETs, CRC32C checked as parts land, tensors
viewed from it; ``restore_into`` reads local weights into the module's own parameters
(``ckptd.intomodule``). ``load`` of a store URL reads this node's daemon root when it holds the
identical checkpoint (``ckptd.localfirst``), and ranks of a node can share one download
(``ckptd.nodecache``, opt-in).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import msgpack
import torch

from .catalog import (
    Located,
    copy_checkpoint,
    list_checkpoints,
    list_runs,
    locate_newest,
    normalize_url,
    open_newest,
    run_sync,
    split_tag,
    verify,
)
from .errors import (
    CkptdError,
    ConfigError,
    IntegrityError,
    NotFoundError,
    SerializationError,
)
from .fmt import TORCH_DTYPES, decode_header
from .intomodule import read_into_module
from .localfirst import daemon_places, local_twin
from .names import check_name, named
from .nodecache import discard, node_copy
from .progress import Progress
from .readinto import Source, map_file, mapping_wanted, read_file, read_files
from .storage import ProgressFn, is_local
from .tree import unflatten

__all__ = [
    "copy_checkpoint",
    "list_checkpoints",
    "list_runs",
    "load",
    "load_newest",
    "locate_newest",
    "restore_into",
    "run_sync",
    "split_tag",
    "verify",
]

log = logging.getLogger("ckptd.reader")
_MAX_EXTRA = 256 << 20
"""extra.msgpack holds plain data (tensors go to extra.safetensors): this is generous."""

# What hostile bytes make the decoders below raise. Each is caught per file and reported as an
# IntegrityError naming the file; nothing else is (a bug must not pass for a bad checkpoint).
_DECODE_ERRORS = (KeyError, IndexError, TypeError, ValueError, AttributeError, RecursionError,
                  OverflowError, RuntimeError, msgpack.UnpackException)  # fmt: skip


# ---- reading files ---------------------------------------------------------------------------


def file_tensors(buf: torch.Tensor, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors of a safetensors file (views of ``buf``) and its metadata; the header is checked
    (``header.decode_header``) before any view is made from it."""
    if len(buf) < 8:
        raise IntegrityError(f"{name}: too short for a safetensors file")
    n = int.from_bytes(bytes(buf[:8].numpy()), "little")
    if 8 + n > len(buf):
        raise IntegrityError(f"{name}: header of {n} bytes runs past the end of the file")
    try:
        header, start = decode_header(bytes(buf[: 8 + n].numpy()), len(buf))
    except IntegrityError as e:
        raise IntegrityError(f"{name}: {e}") from e
    meta = header.pop("__metadata__", None) or {}
    out: dict[str, torch.Tensor] = {}
    for key, info in header.items():
        b, e = info["data_offsets"]
        dtype = TORCH_DTYPES[info["dtype"]]
        raw = buf[start + b : start + e]
        itemsize = torch.empty((), dtype=dtype).element_size()
        if (start + b) % itemsize:
            raw = raw.clone()
        try:
            out[key] = raw.view(dtype).reshape(info["shape"])
        except RuntimeError as exc:
            raise IntegrityError(f"{name}: tensor {key} does not fit its declared shape") from exc
    return out, meta


FROZEN = ".frozen.safetensors"
WEIGHTS = ".weights.safetensors"


def _decode_model(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, str],
    frozen: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """A model's state dict from its weights file and, when it has frozen parameters, its
    ``.frozen.safetensors`` (stored apart so that it can be shared between checkpoints)."""
    sd: dict[str, Any] = dict(frozen or {})
    sd.update((k, v) for k, v in tensors.items() if not k.startswith("__nontensor__"))
    aliases = json.loads(meta.get("ckptd.aliases", "{}"))
    if not isinstance(aliases, dict):
        raise TypeError("ckptd.aliases is not an object")
    for alias, target in aliases.items():
        sd[alias] = sd[target]
    if "ckptd.nontensor" in meta:
        rest = unflatten(json.loads(meta["ckptd.nontensor"]), tensors)
        if not isinstance(rest, dict):
            raise TypeError("ckptd.nontensor is not an object")
        sd.update(rest)
    return sd


def _unpack_extra(data: bytes) -> Any:
    """extra.msgpack as plain data, with the unpacker's limits tied to the file's own size (no
    declared length can allocate more than the bytes that back it) and ext types refused."""
    if len(data) > _MAX_EXTRA:
        raise ValueError(f"{len(data)} bytes (at most {_MAX_EXTRA})")

    def no_ext(code: int, payload: bytes) -> Any:
        raise ValueError(f"msgpack extension type {code} is not plain data")

    n = max(len(data), 1)
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, ext_hook=no_ext,
                                max_buffer_size=n, max_array_len=n, max_map_len=n)  # fmt: skip
    unpacker.feed(data)
    obj = unpacker.unpack()
    if unpacker.tell() != len(data):
        raise ValueError(f"{len(data) - unpacker.tell()} bytes after the value")
    return obj


def _decode_file(
    name: str, buf: torch.Tensor, result: dict[str, Any], extra: dict[str, Any]
) -> None:
    """Decode one verified file into ``result`` (models, optimizers) or ``extra`` (its parts)."""
    if name.endswith(FROZEN):
        model = check_name(name[: -len(FROZEN)], "model name")
        result.setdefault("__frozen__", {})[model] = file_tensors(buf, name)[0]
    elif name.endswith(WEIGHTS):
        model = check_name(name[: -len(WEIGHTS)], "model name")
        tensors, meta = file_tensors(buf, name)
        result[model] = _decode_model(tensors, meta, result.get("__frozen__", {}).pop(model, None))
    elif name.endswith(".optim.safetensors"):
        model = check_name(name[: -len(".optim.safetensors")], "model name")
        tensors, meta = file_tensors(buf, name)
        if "ckptd.optimizer" not in meta:
            raise IntegrityError(f"{name}: no optimizer state in its metadata")
        result["optimizers"][model] = unflatten(json.loads(meta["ckptd.optimizer"]), tensors)
    elif name == "extra.safetensors":
        # Small, and users hand them to APIs (Generator.set_state) that want own storage.
        extra["tensors"] = {k: v.clone() for k, v in file_tensors(buf, name)[0].items()}
    elif name == "extra.msgpack":
        extra["skeleton"] = _unpack_extra(bytes(buf.numpy()))


def read_tensors(
    loc: Located, names: list[str], progress: ProgressFn | None = None
) -> dict[str, torch.Tensor]:
    """The listed files ``names`` of ``loc``, each whole in one uint8 tensor allocated once and
    filled in place (``readinto``: local preadv or concurrent ranged GETs, CRC32C checked as the
    parts land). The tensors a file holds are then views of its buffer: no second copy."""
    bufs: dict[str, torch.Tensor] = {}

    def alloc(name: str, size: int) -> memoryview:
        bufs[name] = torch.empty(size, dtype=torch.uint8)
        return memoryview(bufs[name].numpy())

    async def go() -> None:
        src = Source.of(loc)
        try:
            if mapping_wanted(src):  # local: the page cache is the memory (``map_file``)
                files = loc.manifest["files"]
                maps = await asyncio.gather(*(map_file(src, n, files[n], progress) for n in names))
                for name, mm in zip(names, maps, strict=True):
                    bufs[name] = (
                        torch.empty(0, dtype=torch.uint8)
                        if mm is None
                        else torch.frombuffer(mm, dtype=torch.uint8)
                    )
                return
            await read_files(src, names, alloc, progress)
        finally:
            await src.close()

    run_sync(go())
    return bufs


def _decode_checkpoint(
    bufs: dict[str, torch.Tensor], manifest: dict[str, Any], map_location: Any
) -> dict[str, Any]:
    """Decode a validated manifest's verified files (``read_tensors``) into plain state."""
    result: dict[str, Any] = {"optimizers": {}}
    extra: dict[str, Any] = {"tensors": {}}
    for name in file_order(manifest["files"]):
        _decode_checked(name, bufs.pop(name), result, extra)
    if result.pop("__frozen__", None):
        raise IntegrityError("a .frozen.safetensors file without its model's weights file")
    result["extra"] = _assemble_extra(extra)
    if "model" in result["optimizers"]:
        result["optimizer"] = result["optimizers"]["model"]
    result["meta"] = manifest
    if map_location is not None and str(map_location) != "cpu":
        result = _to_device(result, map_location)
    return result


def file_order(files: dict[str, Any]) -> list[str]:
    """Frozen parts first (a weights file's aliases may name their tensors), then weights,
    then the rest, each in listed order."""
    return sorted(files, key=lambda n: (not n.endswith(FROZEN), not n.endswith(WEIGHTS)))


class ModelGroups:
    """Files that arrive in any order (reads finish when they finish), handed on for decoding
    once everything they need is there: a model's ``.frozen.safetensors`` with its weights file
    (whose aliases may name frozen tensors), everything else at once."""

    def __init__(self, files: dict[str, Any]) -> None:
        self._files = files
        self._waiting: dict[str, Any] = {}

    def arrived(self, name: str, buf: Any) -> list[tuple[str, Any]]:
        for suffix in (FROZEN, WEIGHTS):
            if name.endswith(suffix):
                model = name[: -len(suffix)]
                break
        else:
            return [(name, buf)]
        group = [n for n in (model + FROZEN, model + WEIGHTS) if n in self._files]
        self._waiting[name] = buf
        if not all(n in self._waiting for n in group):
            return []
        return [(n, self._waiting.pop(n)) for n in group]


def _decode_checked(
    name: str, buf: torch.Tensor, result: dict[str, Any], extra: dict[str, Any]
) -> None:
    try:
        _decode_file(name, buf, result, extra)
    except IntegrityError:
        raise
    except (CkptdError, *_DECODE_ERRORS) as e:
        raise IntegrityError(f"{name}: malformed content: {e!r}") from e


def _assemble_extra(extra: dict[str, Any]) -> Any:
    try:
        skel = extra.get("skeleton")
        return None if skel is None else unflatten(skel, extra["tensors"])
    except (CkptdError, *_DECODE_ERRORS) as e:
        raise IntegrityError(f"extra.msgpack: malformed content: {e!r}") from e


def _to_device(obj: Any, device: Any, non_blocking: bool = False) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: _to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device, non_blocking) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_device(v, device, non_blocking) for v in obj)
    return obj


def _is_cuda(map_location: Any) -> bool:
    if map_location is None or isinstance(map_location, dict) or callable(map_location):
        return False
    try:
        return torch.device(map_location).type == "cuda" and torch.cuda.is_available()
    except (RuntimeError, TypeError):
        return False


def _load_to_cuda(loc: Located, device: Any, progress: ProgressFn) -> dict[str, Any]:
    """``load`` onto a GPU: each file is read into a pinned host buffer and, as soon as it has
    verified, its tensors are copied to the device on a side stream (``non_blocking``), while
    the next files are still being read. The caller's stream waits for the copies at the end,
    and the pinned buffers are kept until then (a pending copy still reads them)."""
    dev = torch.device(device)
    stream = torch.cuda.Stream(dev)
    pinned: dict[str, torch.Tensor] = {}
    keep: list[torch.Tensor] = []
    result: dict[str, Any] = {"optimizers": {}}
    extra: dict[str, Any] = {"tensors": {}}

    def alloc(name: str, size: int) -> memoryview:
        pinned[name] = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return memoryview(pinned[name].numpy())

    group = ModelGroups(loc.manifest["files"])

    def done(name: str) -> None:
        buf = pinned.pop(name)
        keep.append(buf)
        part: dict[str, Any] = {"optimizers": {}}
        ready = group.arrived(name, buf)  # a model's files decode together, frozen first
        if not ready:
            return
        for n, b in ready:
            _decode_checked(n, b, part, extra)
        part.pop("__frozen__", None)
        with torch.cuda.stream(stream):
            moved = _to_device(part, dev, non_blocking=True)
        result["optimizers"].update(moved.pop("optimizers"))
        result.update(moved)

    async def go() -> None:
        src = Source.of(loc)
        try:
            await read_files(src, list(loc.manifest["files"]), alloc, progress, done)
        finally:
            await src.close()

    run_sync(go())
    with torch.cuda.stream(stream):
        result["extra"] = _to_device(_assemble_extra(extra), dev, non_blocking=True)
    torch.cuda.current_stream(dev).wait_stream(stream)
    stream.synchronize()  # then the pinned buffers may go
    keep.clear()
    if "model" in result["optimizers"]:
        result["optimizer"] = result["optimizers"]["model"]
    result["meta"] = loc.manifest
    return result


def _refuse_sharded(manifest: dict[str, Any], where: str) -> None:
    if manifest.get("kind") == "dcp":
        raise ConfigError(
            f"{where}@{manifest.get('tag')} is a sharded checkpoint saved through "
            "torch.distributed.checkpoint (dcp); load it with dcp.load(state, checkpoint_id=TAG, "
            f"storage_reader=ckptd.dcp.Reader(url={where!r}))"
        )


def _load_located(
    loc: Located, map_location: Any, places: tuple[str, str | None] | None = None
) -> dict[str, Any]:
    """Read and decode ``loc``; from this node's daemon root when it holds the very same
    checkpoint (``ckptd.localfirst``), falling back to the store when that copy fails."""
    _refuse_sharded(loc.manifest, loc.url)
    twin = local_twin(loc, places)
    if twin is not None:
        try:
            return _read_decode(twin, map_location, f"{loc.url}@{loc.tag} (local copy)")
        except IntegrityError as e:
            log.warning("the local copy %s does not verify (%s); reading the store", twin.url, e)
    with node_copy(loc) as cached:
        if cached is not None:
            try:
                return _read_decode(cached, map_location, f"{loc.url}@{loc.tag} (node cache)")
            except IntegrityError as e:
                log.warning(
                    "node cache copy %s does not verify (%s); reading the store", cached.url, e
                )
                discard(cached)
    return _read_decode(loc, map_location, f"{loc.url}@{loc.tag}")


def _read_decode(loc: Located, map_location: Any, label: str) -> dict[str, Any]:
    total = sum(int(rec["size"]) for rec in loc.manifest["files"].values())
    with Progress(total, f"load {label}") as p:
        if _is_cuda(map_location):
            return _load_to_cuda(loc, map_location, p)
        bufs = read_tensors(loc, list(loc.manifest["files"]), p)
    return _decode_checkpoint(bufs, loc.manifest, map_location)


def load(url: str, tag: str = "latest", map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint as plain state: ``{"model": state_dict, "optimizer": ..., "extra", "meta"}``.

    ``url`` is a run (``<store>/<run>``: a path, ``file://``, ``s3://`` or ``gs://`` URL) or a local
    checkpoint directory. Checksums are verified; an ``IntegrityError`` names the bad file. Models
    saved with ``models={name: ...}`` appear under their names; all optimizer states are under
    ``"optimizers"`` by model name (and the default one also as ``"optimizer"``).
    """
    places = None if is_local(url) else daemon_places()
    found = _load_best([url], tag, map_location, fall_back=False, places=places)
    if found is None:
        raise NotFoundError(f"no complete checkpoint in {normalize_url(url)[0]}")
    return found[1]


def _load_best(
    urls: list[str],
    tag: str,
    map_location: Any,
    *,
    fall_back: bool,
    places: tuple[str, str | None] | None = None,
) -> tuple[Located, dict[str, Any]] | None:
    """The newest checkpoint over ``urls`` that loads (``catalog.open_newest``), loaded."""

    def read(loc: Located) -> dict[str, Any]:
        return _load_located(loc, map_location, places)

    return open_newest(urls, tag, read, fall_back=fall_back)


def load_newest(
    urls: list[str], tag: str = "latest", map_location: Any = "cpu"
) -> dict[str, Any] | None:
    """``load`` of the newest checkpoint that verifies over all of ``urls`` (the daemon's root
    and the store; the earlier URL wins a tie, it is local), falling back to older ones.

    None: no location has a checkpoint. ``NotFoundError``: a named ``tag`` is nowhere.
    ``IntegrityError``: checkpoints exist and none verifies.
    """
    found = _load_best(urls, tag, map_location, fall_back=True)
    return None if found is None else found[1]


def restore_into(
    urls: list[str],
    *,
    tag: str = "latest",
    model: Any = None,
    optimizer: Any = None,
    models: dict[str, Any] | None = None,
    optimizers: dict[str, Any] | None = None,
    strict: bool = True,
    map_location: Any = None,
) -> dict[str, Any] | None:
    """Apply the newest checkpoint that verifies over all of ``urls`` (see ``load_newest``).

    None: no location has a checkpoint yet. A named ``tag`` that no location has raises
    ``NotFoundError``; checkpoints none of which verifies, ``IntegrityError`` (a fresh start
    would lose them).

    File by file, so that the state is never held twice: each weights file is read (from a
    local copy straight into the module's own tensors, see ``ckptd.intomodule``), verified and
    applied before the next is read; optimizer states keep the tensors read for them. A file
    that fails verification may already have been applied: the fallback to an older checkpoint
    applies that one over it, and when none verifies the objects are left partly restored.
    """
    all_models, all_optims = named(model, models), named(optimizer, optimizers)

    def apply(loc: Located) -> Any:
        return _apply_located(loc, all_models, all_optims, strict, map_location)

    found = open_newest(urls, tag, apply, fall_back=True)
    if found is None:
        return None
    loc, extra = found
    log.info("restored %s@%s (step %s)", loc.url, loc.tag, loc.manifest.get("step"))
    return {**loc.manifest, "extra": extra, "url": loc.url}


def _apply_located(
    loc: Located,
    all_models: dict[str, Any],
    all_optims: dict[str, Any],
    strict: bool,
    map_location: Any,
) -> Any:
    """Read, verify and apply ``loc`` to the objects one file at a time; returns its extra."""
    _refuse_sharded(loc.manifest, loc.url)
    files: dict[str, Any] = loc.manifest["files"]
    have = [n[: -len(".weights.safetensors")] for n in files if n.endswith(".weights.safetensors")]
    for name in all_models:
        if f"{name}.weights.safetensors" not in files:
            raise SerializationError(f"checkpoint {loc.tag} has no model {name!r} (has {have})")
    for name in all_optims:
        if f"{name}.optim.safetensors" not in files:
            raise SerializationError(f"checkpoint {loc.tag} has no optimizer state for {name!r}")
    with node_copy(loc) as cached:
        if cached is not None:
            try:
                return _apply_from(cached, all_models, all_optims, strict, map_location)
            except IntegrityError as e:
                log.warning(
                    "node cache copy %s does not verify (%s); reading the store", cached.url, e
                )
                discard(cached)
    return _apply_from(loc, all_models, all_optims, strict, map_location)


def _apply_from(
    loc: Located,
    all_models: dict[str, Any],
    all_optims: dict[str, Any],
    strict: bool,
    map_location: Any,
) -> Any:
    files: dict[str, Any] = loc.manifest["files"]
    on_cpu = map_location is None or str(map_location) == "cpu"
    total = sum(int(rec["size"]) for rec in files.values())
    # Weights first, each dropped once applied; optimizer states then keep their buffers.
    order = file_order(files)
    extra: dict[str, Any] = {"tensors": {}, "frozen": {}}

    async def go(progress: Progress) -> None:
        src = Source.of(loc)  # one event loop for all files: the store's client lives in it
        try:
            for fname in order:
                await _apply_file(src, fname, all_models, all_optims, strict, on_cpu,
                                  map_location, extra, progress)  # fmt: skip
        finally:
            await src.close()

    with Progress(total, f"restore {loc.url}@{loc.tag}") as p:
        run_sync(go(p))
    return _assemble_extra(extra)


async def _apply_file(
    src: Source,
    fname: str,
    all_models: dict[str, Any],
    all_optims: dict[str, Any],
    strict: bool,
    on_cpu: bool,
    map_location: Any,
    extra: dict[str, Any],
    progress: ProgressFn,
) -> None:
    rec = src.loc.manifest["files"][fname]
    suffix = FROZEN if fname.endswith(FROZEN) else WEIGHTS
    model_name = fname[: -len(suffix)]
    obj = all_models.get(model_name) if fname.endswith((WEIGHTS, FROZEN)) else None
    if isinstance(obj, torch.nn.Module) and on_cpu and src.store is None:
        tensors, meta = await read_into_module(src, fname, rec, obj, progress)
        if suffix == FROZEN:  # applied with its weights file, which comes next
            extra["frozen"][model_name] = tensors
            return
        try:
            state = _decode_model(tensors, meta, extra["frozen"].pop(model_name, None))
        except (CkptdError, *_DECODE_ERRORS) as e:
            raise IntegrityError(f"{fname}: malformed content: {e!r}") from e
        obj.load_state_dict(state, strict=strict)
        return
    if on_cpu and mapping_wanted(src):  # local: the mapped file is the optimizer's memory
        mm = await map_file(src, fname, rec, progress)
        buf = (
            torch.empty(0, dtype=torch.uint8)
            if mm is None
            else torch.frombuffer(mm, dtype=torch.uint8)
        )
    else:
        buf = torch.empty(int(rec["size"]), dtype=torch.uint8)
        await read_file(src, fname, rec, memoryview(buf.numpy()), progress)
    result: dict[str, Any] = {"optimizers": {}, "__frozen__": extra["frozen"]}
    _decode_checked(fname, buf, result, extra)
    result.pop("__frozen__")
    del buf  # a weights file's buffer goes once applied; an optimizer state keeps its views
    if not on_cpu:
        result = _to_device(result, map_location)
    for name, state in result.items():
        if name == "optimizers":
            for oname, ostate in state.items():
                if oname in all_optims:
                    all_optims[oname].load_state_dict(ostate)
        elif name in all_models:
            target = all_models[name]
            if isinstance(target, torch.nn.Module):
                target.load_state_dict(state, strict=strict)
            else:
                target.update(state)


def _model_names(state: dict[str, Any]) -> list[str]:
    return [k for k in state if k not in ("optimizers", "optimizer", "extra", "meta")]
