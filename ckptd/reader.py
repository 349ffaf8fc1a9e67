"""Reading checkpoints back: ``load``, ``verify``, listing, and restoring into live objects.

Readers trust nothing but the manifest: a checkpoint exists iff ``MANIFEST.json`` exists and
every file it lists has the listed size and CRC32C. ``latest`` is only a hint; when it is missing,
stale or names a checkpoint that fails verification, the newest verifying manifest wins.
Nothing is ever unpickled: tensors come from safetensors data sections, the rest from JSON and
msgpack.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import crc32c
import msgpack
import torch

from .errors import CkptdError, IntegrityError, NotFoundError, SerializationError
from .fmt import TORCH_DTYPES, decode_header
from .names import check_name
from .storage import Store, is_local, join_key, local_path, open_store
from .tree import unflatten

log = logging.getLogger("ckptd.reader")
T = TypeVar("T")
_CHUNK = 64 << 20


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, also when the caller already has a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def split_tag(url: str) -> tuple[str, str]:
    """``URL@TAG`` -> (URL, TAG); no ``@`` (after the last '/') means latest."""
    head, sep, tail = url.rpartition("@")
    if sep and "/" not in tail and tail:
        return head, tail
    return url, "latest"


@dataclass(slots=True)
class Located:
    """A run as a store (``<store>/<run>`` is itself a store URL) and one of its manifests."""

    url: str
    tag: str
    manifest: dict[str, Any]


def _normalize(url: str) -> tuple[str, str | None]:
    """Accept a run URL, or a local checkpoint directory (then its tag is implied)."""
    if is_local(url):
        path = local_path(url)
        if os.path.isfile(os.path.join(path, "MANIFEST.json")):
            return os.path.dirname(os.path.dirname(path)), os.path.basename(path)
        return path, None
    return url.rstrip("/"), None


async def _read_manifest(store: Store, tag: str) -> dict[str, Any]:
    check_name(tag, "tag")
    raw = await store.get_bytes(join_key("checkpoints", tag, "MANIFEST.json"))
    try:
        manifest = json.loads(raw)
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no files table")
    except ValueError as e:
        raise IntegrityError(f"{store.url}: manifest of {tag} is unreadable: {e}") from e
    return manifest


async def _list_manifests(store: Store) -> list[dict[str, Any]]:
    """Every manifest of the run, oldest first."""
    objs = await store.list("checkpoints/")
    tags = [
        o.key.split("/")[1]
        for o in objs
        if o.key.count("/") == 2 and o.key.endswith("/MANIFEST.json")
    ]
    out = []
    for tag in tags:
        try:
            out.append(await _read_manifest(store, tag))
        except (IntegrityError, NotFoundError, CkptdError) as e:
            log.warning("skipping %s: %s", tag, e)
    return sorted(out, key=lambda m: (int(m.get("step", -1)), str(m.get("created", ""))))


async def _candidates(store: Store, tag: str) -> list[dict[str, Any]]:
    """Manifests to try, best first: the named tag; or for latest, the pointer then newest first."""
    if tag != "latest":
        return [await _read_manifest(store, tag)]
    manifests = await _list_manifests(store)
    if not manifests:
        return []
    try:
        hint = (await store.get_bytes("latest")).decode().strip()
    except (NotFoundError, UnicodeDecodeError):
        hint = ""
    ordered = list(reversed(manifests))
    newest = ordered[0]
    for m in ordered:
        if m.get("tag") == hint and int(m.get("step", -1)) >= int(newest.get("step", -1)):
            ordered.remove(m)
            ordered.insert(0, m)
            break
    return ordered


def list_checkpoints(url: str) -> list[dict[str, Any]]:
    """Manifests of every committed checkpoint of the run at ``url``, oldest first."""
    base, _ = _normalize(url)

    async def go() -> list[dict[str, Any]]:
        async with open_store(base) as store:
            return await _list_manifests(store)

    return run_sync(go())


def list_runs(url: str) -> list[str]:
    """Runs under a store URL: every prefix that has ``checkpoints/<tag>/MANIFEST.json``."""

    async def go() -> list[str]:
        async with open_store(url) as store:
            objs = await store.list("")
        runs = set()
        for o in objs:
            parts = o.key.split("/")
            if len(parts) >= 4 and parts[-1] == "MANIFEST.json" and parts[-3] == "checkpoints":
                runs.add("/".join(parts[:-3]))
        return sorted(runs)

    return run_sync(go())


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


async def _fetch(store: Store, manifest: dict[str, Any], into: str) -> None:
    prefix = join_key("checkpoints", manifest["tag"])

    async def one(name: str, rec: dict[str, Any]) -> None:
        await store.get_file(
            join_key(prefix, name), os.path.join(into, name), size=int(rec["size"])
        )

    await asyncio.gather(*(one(n, r) for n, r in manifest["files"].items()))


def _load_located(loc: Located, map_location: Any) -> dict[str, Any]:
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


def verify(url: str, tag: str = "latest") -> Located:
    """Check every file of a checkpoint against its manifest; raises ``IntegrityError``."""
    base, implied = _normalize(url)
    if implied is not None and tag == "latest":
        tag = implied

    async def go() -> Located:
        async with open_store(base) as store:
            cands = await _candidates(store, tag)
            if not cands:
                raise NotFoundError(f"no complete checkpoint in {base}")
            manifest = cands[0]
            loc = Located(base, manifest["tag"], manifest)
            if is_local(base):
                directory = os.path.join(local_path(base), "checkpoints", loc.tag)
                await asyncio.to_thread(_verify_dir, directory, manifest)
            else:
                with tempfile.TemporaryDirectory(prefix="ckptd-verify-") as tmp:
                    await _fetch(store, manifest, tmp)
                    await asyncio.to_thread(_verify_dir, tmp, manifest)
            return loc

    return run_sync(go())


def _verify_dir(directory: str, manifest: dict[str, Any]) -> None:
    for name, rec in manifest["files"].items():
        path = os.path.join(directory, name)
        try:
            with open(path, "rb", buffering=0) as f:
                actual = os.fstat(f.fileno()).st_size
                if actual != int(rec["size"]):
                    raise IntegrityError(f"{name}: {actual} bytes, manifest says {rec['size']}")
                value = 0
                while chunk := f.read(_CHUNK):
                    value = crc32c.crc32c(chunk, value)
        except FileNotFoundError as e:
            raise IntegrityError(f"{name}: listed in the manifest but missing") from e
        if f"{value:08x}" != str(rec["crc32c"]).lower():
            raise IntegrityError(
                f"{name}: CRC32C {value:08x} does not match the manifest's {rec['crc32c']}"
            )


def copy_checkpoint(url: str, tag: str, dest: str) -> Located:
    """Copy a verified checkpoint (files + MANIFEST.json) into the local directory ``dest``."""
    loc = verify(url, tag)
    os.makedirs(dest, exist_ok=True)
    if is_local(loc.url):
        src = os.path.join(local_path(loc.url), "checkpoints", loc.tag)
        for name in loc.manifest["files"]:
            shutil.copyfile(os.path.join(src, name), os.path.join(dest, name))
    else:

        async def go() -> None:
            async with open_store(loc.url) as store:
                await _fetch(store, loc.manifest, dest)

        run_sync(go())
    _verify_dir(dest, loc.manifest)
    with open(os.path.join(dest, "MANIFEST.json"), "w") as f:
        json.dump(loc.manifest, f, indent=1)
    return loc


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
    all_models = dict(models or {})
    if model is not None:
        all_models.setdefault("model", model)
    all_optims = dict(optimizers or {})
    if optimizer is not None:
        all_optims.setdefault("model", optimizer)
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
