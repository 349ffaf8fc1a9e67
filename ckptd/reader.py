"""Reading checkpoints back: ``load``, ``verify``, listing, and restoring into live objects.

Readers trust nothing but the manifest: a checkpoint exists iff ``MANIFEST.json`` exists and
every file it lists has the listed size and CRC32C. ``latest`` is only a hint; when it is missing,
stale or names a checkpoint that fails verification, the newest verifying manifest wins.
Nothing is ever unpickled: tensors come from safetensors data sections, the rest from JSON and
msgpack.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

import crc32c
import msgpack
import torch

from .catalog import (
    Located,
    _candidates,
    _fetch,
    _normalize,
    checkpoint_directory,
    copy_checkpoint,
    list_checkpoints,
    list_runs,
    run_sync,
    split_tag,
    verify,
)
from .errors import ConfigError, IntegrityError, NotFoundError, SerializationError
from .fmt import TORCH_DTYPES, decode_header
from .names import named
from .storage import is_local, local_path, open_store
from .tree import unflatten

__all__ = [
    "copy_checkpoint",
    "list_checkpoints",
    "list_runs",
    "load",
    "restore_into",
    "run_sync",
    "split_tag",
    "verify",
]

log = logging.getLogger("ckptd.reader")
_CHUNK = 64 << 20


# ---- reading files ---------------------------------------------------------------------------


def _read_verified(path: str, name: str, rec: dict[str, Any]) -> torch.Tensor:
    """The whole file as a uint8 tensor, after checking its size and CRC32C."""
    size = int(rec["size"])
    try:
        with open(path, "rb", buffering=0) as f:
            actual = os.fstat(f.fileno()).st_size
            if actual != size:
                raise IntegrityError(f"{name}: {actual} bytes on disk, manifest says {size}")
            buf = torch.empty(size, dtype=torch.uint8)
            view = memoryview(buf.numpy())
            value = 0
            pos = 0
            while pos < size:
                n = f.readinto(view[pos : pos + _CHUNK])
                if not n:
                    raise IntegrityError(f"{name}: file ended at byte {pos} of {size}")
                value = crc32c.crc32c(view[pos : pos + n], value)
                pos += n
    except FileNotFoundError as e:
        raise IntegrityError(f"{name}: listed in the manifest but missing") from e
    want = str(rec["crc32c"]).lower()
    if f"{value:08x}" != want:
        raise IntegrityError(f"{name}: CRC32C {value:08x} does not match the manifest's {want}")
    return buf


def _tensors(buf: torch.Tensor, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if len(buf) < 8:
        raise IntegrityError(f"{name}: too short for a safetensors file")
    n = int.from_bytes(bytes(buf[:8].numpy()), "little")
    if 8 + n > len(buf):
        raise IntegrityError(f"{name}: header of {n} bytes runs past the end of the file")
    try:
        header, start = decode_header(bytes(buf[: 8 + n].numpy()), len(buf))
    except IntegrityError as e:
        raise IntegrityError(f"{name}: {e}") from e
    meta = header.pop("__metadata__", {}) or {}
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
    for alias, target in json.loads(meta.get("ckptd.aliases", "{}")).items():
        sd[alias] = sd[target]
    if "ckptd.nontensor" in meta:
        sd.update(unflatten(json.loads(meta["ckptd.nontensor"]), tensors))
    return sd


def _load_dir(directory: str, manifest: dict[str, Any], map_location: Any) -> dict[str, Any]:
    files = manifest["files"]
    result: dict[str, Any] = {"optimizers": {}}
    extra_tensors: dict[str, torch.Tensor] = {}
    extra_skel: Any = None
    for name, rec in files.items():
        if os.sep in name or name.startswith("."):
            raise IntegrityError(f"manifest lists a file outside its checkpoint: {name!r}")
        buf = _read_verified(os.path.join(directory, name), name, rec)
        if name.endswith(".weights.safetensors"):
            tensors, meta = _tensors(buf, name)
            result[name[: -len(".weights.safetensors")]] = _decode_model(tensors, meta)
        elif name.endswith(".optim.safetensors"):
            tensors, meta = _tensors(buf, name)
            if "ckptd.optimizer" not in meta:
                raise IntegrityError(f"{name}: no optimizer state in its metadata")
            result["optimizers"][name[: -len(".optim.safetensors")]] = unflatten(
                json.loads(meta["ckptd.optimizer"]), tensors
            )
        elif name == "extra.safetensors":
            # Small, and users hand them to APIs (Generator.set_state) that want own storage.
            extra_tensors = {k: v.clone() for k, v in _tensors(buf, name)[0].items()}
        elif name == "extra.msgpack":
            extra_skel = msgpack.unpackb(bytes(buf.numpy()), raw=False, strict_map_key=False)
    result["extra"] = unflatten(extra_skel, extra_tensors) if extra_skel is not None else None
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
    if is_local(loc.url):
        return _load_dir(
            os.path.join(local_path(loc.url), "checkpoints", loc.tag), loc.manifest, map_location
        )
    with tempfile.TemporaryDirectory(prefix="ckptd-load-") as tmp:

        async def go() -> None:
            async with open_store(loc.url) as store:
                await _fetch(store, loc.manifest, tmp)

        run_sync(go())
        return _load_dir(tmp, loc.manifest, map_location)


def load(url: str, tag: str = "latest", map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint as plain state: ``{"model": state_dict, "optimizer": ..., "extra", "meta"}``.

    ``url`` is a run (``<store>/<run>``: a path, ``file://``, ``s3://`` or ``gs://`` URL) or a local
    checkpoint directory. Checksums are verified; an ``IntegrityError`` names the bad file. Models
    saved with ``models={name: ...}`` appear under their names; all optimizer states are under
    ``"optimizers"`` by model name (and the default one also as ``"optimizer"``).
    """
    return _load_best(url, tag, map_location, fall_back=False)[0]


def _load_best(
    url: str, tag: str, map_location: Any, *, fall_back: bool
) -> tuple[dict[str, Any], Located]:
    if (direct := checkpoint_directory(url)) is not None:
        path, manifest = direct
        loc = Located(path, str(manifest.get("tag")), manifest, directory=path)
        _refuse_sharded(manifest, path)
        try:
            return _load_dir(path, manifest, map_location), loc
        except IntegrityError as e:
            raise IntegrityError(f"{path}: {e}") from e
    base, implied = _normalize(url)
    if implied is not None and tag == "latest":
        tag = implied

    async def cands() -> list[dict[str, Any]]:
        async with open_store(base) as store:
            return await _candidates(store, tag)

    manifests = run_sync(cands())
    if not manifests:
        raise NotFoundError(f"no complete checkpoint in {base}")
    first_error: IntegrityError | None = None
    for manifest in manifests if fall_back else manifests[:1]:
        loc = Located(base, manifest["tag"], manifest)
        try:
            result = _load_located(loc, map_location)
        except IntegrityError as e:
            if not fall_back:
                raise IntegrityError(f"{base}@{loc.tag}: {e}") from e
            log.warning(
                "checkpoint %s@%s does not verify (%s); trying an older one", base, loc.tag, e
            )
            first_error = first_error or e
            continue
        if first_error is not None:
            log.warning("restored %s@%s, the newest checkpoint that verifies", base, loc.tag)
        return result, loc
    raise IntegrityError(f"no checkpoint in {base} verifies; newest error: {first_error}")


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
    """Find the newest verifying checkpoint in the first of ``urls`` that has one, and apply it."""
    all_models, all_optims = named(model, models), named(optimizer, optimizers)
    state: dict[str, Any] | None = None
    loc: Located | None = None
    errors: list[str] = []
    for url in urls:
        try:
            state, loc = _load_best(url, tag, map_location, fall_back=tag == "latest")
            break
        except NotFoundError as e:
            errors.append(str(e))
        except IntegrityError as e:
            errors.append(str(e))
            log.warning("%s", e)
    if state is None or loc is None:
        if tag == "latest" and not any("verifies" in e for e in errors):
            return None
        raise NotFoundError(f"checkpoint {tag!r} not found: " + "; ".join(errors))
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
