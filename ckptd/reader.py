"""Reading checkpoints back: ``load``, ``verify``, listing, and restoring into live objects.

Readers trust nothing but the manifest: a checkpoint exists iff ``MANIFEST.json`` exists and
every file it lists has the listed size and CRC32C. ``latest`` is only a hint; when it is missing,
stale or names a checkpoint that fails verification, the newest verifying manifest wins.
``restore_into`` and ``load_newest`` look over several locations (the daemon's root and the
store) with ``catalog.open_newest``: the newest checkpoint that verifies in any of them.
Nothing is ever unpickled: tensors come from safetensors data sections, the rest from JSON and
msgpack.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import crc32c
import msgpack
import torch

from .catalog import (
    Located,
    copy_checkpoint,
    list_checkpoints,
    list_runs,
    local_files,
    locate_newest,
    normalize_url,
    open_listed,
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
from .names import check_name, named
from .progress import Progress
from .storage import ProgressFn
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
_CHUNK = 64 << 20
_MAX_EXTRA = 256 << 20
"""extra.msgpack holds plain data (tensors go to extra.safetensors): this is generous."""

# What hostile bytes make the decoders below raise. Each is caught per file and reported as an
# IntegrityError naming the file; nothing else is (a bug must not pass for a bad checkpoint).
_DECODE_ERRORS = (KeyError, IndexError, TypeError, ValueError, AttributeError, RecursionError,
                  OverflowError, RuntimeError, msgpack.UnpackException)  # fmt: skip


# ---- reading files ---------------------------------------------------------------------------


def read_verified(
    base: str, parts: list[str], rec: dict[str, Any], progress: ProgressFn | None = None
) -> torch.Tensor:
    """The file ``base/parts...`` whole as a uint8 tensor, after checking size and CRC32C; it is
    never reached through a symbolic link (see ``catalog.open_listed``)."""
    name = parts[-1]
    size = rec["size"]
    with open_listed(base, parts, rec) as f:
        buf = torch.empty(size, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        value = 0
        pos = 0
        while pos < size:
            n = f.readinto(view[pos : pos + _CHUNK])  # type: ignore[attr-defined]
            if not n:
                raise IntegrityError(f"{name}: file ended at byte {pos} of {size}")
            value = crc32c.crc32c(view[pos : pos + n], value)
            pos += n
            if progress is not None:
                progress(n)
    want = rec["crc32c"].lower()
    if f"{value:08x}" != want:
        raise IntegrityError(f"{name}: CRC32C {value:08x} does not match the manifest's {want}")
    return buf


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


def _decode_model(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, Any]:
    sd: dict[str, Any] = {k: v for k, v in tensors.items() if not k.startswith("__nontensor__")}
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
    if name.endswith(".weights.safetensors"):
        model = check_name(name[: -len(".weights.safetensors")], "model name")
        tensors, meta = file_tensors(buf, name)
        result[model] = _decode_model(tensors, meta)
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


def _load_dir(
    base: str,
    parts: list[str],
    manifest: dict[str, Any],
    map_location: Any,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Load a validated manifest's files from ``base/parts...`` (a local checkpoint)."""
    result: dict[str, Any] = {"optimizers": {}}
    extra: dict[str, Any] = {"tensors": {}}
    for name, rec in manifest["files"].items():
        buf = read_verified(base, [*parts, name], rec, progress)
        try:
            _decode_file(name, buf, result, extra)
        except IntegrityError:
            raise
        except (CkptdError, *_DECODE_ERRORS) as e:
            raise IntegrityError(f"{name}: malformed content: {e!r}") from e
    try:
        skel = extra.get("skeleton")
        result["extra"] = None if skel is None else unflatten(skel, extra["tensors"])
    except (CkptdError, *_DECODE_ERRORS) as e:
        raise IntegrityError(f"extra.msgpack: malformed content: {e!r}") from e
    if "model" in result["optimizers"]:
        result["optimizer"] = result["optimizers"]["model"]
    result["meta"] = manifest
    if map_location is not None and str(map_location) != "cpu":
        result = _to_device(result, map_location)
    return result


def _to_device(obj: Any, device: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_device(v, device) for v in obj)
    return obj


def _refuse_sharded(manifest: dict[str, Any], where: str) -> None:
    if manifest.get("kind") == "dcp":
        raise ConfigError(
            f"{where}@{manifest.get('tag')} is a sharded checkpoint saved through "
            "torch.distributed.checkpoint (dcp); load it with dcp.load(state, checkpoint_id=TAG, "
            f"storage_reader=ckptd.dcp.Reader(url={where!r}))"
        )


def _load_located(loc: Located, map_location: Any) -> dict[str, Any]:
    _refuse_sharded(loc.manifest, loc.url)
    total = sum(int(rec["size"]) for rec in loc.manifest["files"].values())
    with local_files(loc) as (base, parts), Progress(total, f"load {loc.url}@{loc.tag}") as p:
        return _load_dir(base, parts, loc.manifest, map_location, p)


def load(url: str, tag: str = "latest", map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint as plain state: ``{"model": state_dict, "optimizer": ..., "extra", "meta"}``.

    ``url`` is a run (``<store>/<run>``: a path, ``file://``, ``s3://`` or ``gs://`` URL) or a local
    checkpoint directory. Checksums are verified; an ``IntegrityError`` names the bad file. Models
    saved with ``models={name: ...}`` appear under their names; all optimizer states are under
    ``"optimizers"`` by model name (and the default one also as ``"optimizer"``).
    """
    found = _load_best([url], tag, map_location, fall_back=False)
    if found is None:
        raise NotFoundError(f"no complete checkpoint in {normalize_url(url)[0]}")
    return found[1]


def _load_best(
    urls: list[str], tag: str, map_location: Any, *, fall_back: bool
) -> tuple[Located, dict[str, Any]] | None:
    """The newest checkpoint over ``urls`` that loads (``catalog.open_newest``), loaded."""
    return open_newest(urls, tag, lambda loc: _load_located(loc, map_location), fall_back=fall_back)


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
    """
    all_models, all_optims = named(model, models), named(optimizer, optimizers)
    found = _load_best(urls, tag, map_location, fall_back=True)
    if found is None:
        return None
    loc, state = found
    for name, obj in all_models.items():
        if name not in state:
            raise SerializationError(
                f"checkpoint {loc.tag} has no model {name!r} (has {_model_names(state)})"
            )
        obj.load_state_dict(state[name], strict=strict) if isinstance(
            obj, torch.nn.Module
        ) else obj.update(state[name])
    for name, opt in all_optims.items():
        if name not in state["optimizers"]:
            raise SerializationError(f"checkpoint {loc.tag} has no optimizer state for {name!r}")
        opt.load_state_dict(state["optimizers"][name])
    log.info("restored %s@%s (step %s)", loc.url, loc.tag, loc.manifest.get("step"))
    return {**loc.manifest, "extra": state["extra"], "url": loc.url}


def _model_names(state: dict[str, Any]) -> list[str]:
    return [k for k in state if k not in ("optimizers", "optimizer", "extra", "meta")]
