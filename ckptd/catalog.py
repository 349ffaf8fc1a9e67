"""Finding and checking checkpoints in any store, without torch (the daemon and CLI use it).

Readers trust nothing but the manifest: a checkpoint exists iff ``MANIFEST.json`` exists and
every file it lists has the listed size and CRC32C. ``latest`` is only a hint; when it is missing,
stale or names a checkpoint that fails verification, the newest verifying manifest wins.
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

from .errors import CkptdError, IntegrityError, NotFoundError
from .names import check_name
from .storage import Store, is_local, join_key, local_path, open_store

log = logging.getLogger("ckptd.catalog")
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
    directory: str | None = None  # set when the checkpoint is a bare local directory


def checkpoint_directory(url: str) -> tuple[str, dict[str, Any]] | None:
    """A local directory holding a MANIFEST.json (a checkpoint, wherever it was copied to)."""
    if not is_local(url):
        return None
    path = local_path(url)
    try:
        with open(os.path.join(path, "MANIFEST.json"), "rb") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise IntegrityError(f"{path}/MANIFEST.json is unreadable: {e}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise IntegrityError(f"{path}/MANIFEST.json has no files table")
    return path, manifest


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


async def _fetch(store: Store, manifest: dict[str, Any], into: str) -> None:
    prefix = join_key("checkpoints", manifest["tag"])

    async def one(name: str, rec: dict[str, Any]) -> None:
        await store.get_file(
            join_key(prefix, name), os.path.join(into, name), size=int(rec["size"])
        )

    await asyncio.gather(*(one(n, r) for n, r in manifest["files"].items()))


def verify(url: str, tag: str = "latest") -> Located:
    """Check every file of a checkpoint against its manifest; raises ``IntegrityError``."""
    if (direct := checkpoint_directory(url)) is not None:
        path, manifest = direct
        _verify_dir(path, manifest)
        return Located(path, str(manifest.get("tag")), manifest, directory=path)
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
    if loc.directory or is_local(loc.url):
        src = loc.directory or os.path.join(local_path(loc.url), "checkpoints", loc.tag)
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
