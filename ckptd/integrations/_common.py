"""Pieces the framework integrations share: tags from file names, plain extras, finding the
newest checkpoint of a run over the daemon's root and the store, and surfacing failed saves."""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..errors import CkptdError, DaemonUnavailableError, NotFoundError
from ..storage import join_key

log = logging.getLogger("ckptd.integrations")

_BAD = re.compile(r"[^A-Za-z0-9._=+-]+")


def tag_for(path: str, step: int, used: set[str]) -> str:
    """A tag from a framework's checkpoint path: its stem, made a valid name, with the step.

    Tags are never overwritten, and frameworks reuse names (``last.ckpt``), so the step is part
    of the tag; a second save at the same step in one process gets a counter.
    """
    stem = os.path.basename(os.fspath(path).rstrip("/"))
    stem = stem[: -len(".ckpt")] if stem.endswith(".ckpt") else stem
    stem = _BAD.sub("_", stem).lstrip(".-_") or "ckpt"
    tag = f"{stem[:150]}_U{step}"
    base, n = tag, 1
    while tag in used:
        tag = f"{base}.{n}"
        n += 1
    used.add(tag)
    return tag


def plain(x: Any, path: str = "") -> Any:
    """Make framework state plain data for ``extra``: tensors and numbers pass; dict subclasses,
    enums, dataclasses and paths are converted; anything else is kept as its ``repr`` (logged),
    because a checkpoint never holds pickles."""
    if isinstance(x, torch.Tensor | bool | int | float | str | bytes) or x is None:
        return x
    if isinstance(x, Mapping):
        return {
            k if isinstance(k, str | int) else str(k): plain(v, f"{path}.{k}") for k, v in x.items()
        }
    if isinstance(x, list):
        return [plain(v, f"{path}.{i}") for i, v in enumerate(x)]
    if isinstance(x, tuple):
        return tuple(plain(v, f"{path}.{i}") for i, v in enumerate(x))
    if isinstance(x, enum.Enum):
        return plain(x.value, path)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return plain(dataclasses.asdict(x), path)
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    try:
        import numpy as np

        if isinstance(x, np.ndarray | np.generic):
            return x
    except ImportError:
        pass
    log.warning("%s: %s is not plain data; saved as its repr", path or "state", type(x).__name__)
    return repr(x)


def run_urls(checkpointer: Any) -> list[str]:
    """Where the run's checkpoints are: the daemon's root first, then the store."""
    urls = [os.path.join(checkpointer.daemon_info.get("root") or "", checkpointer.run)]
    store = checkpointer.store or checkpointer.daemon_info.get("store")
    if store:
        urls.append(
            join_key(store, checkpointer.run)
            if "://" in store
            else os.path.join(store, checkpointer.run)
        )
    return urls


def load_tag(urls: list[str], tag: str, map_location: Any = "cpu") -> dict[str, Any]:
    """``ckptd.load`` of ``tag`` from the first of ``urls`` whose copy verifies."""
    state = newest(urls, tag, map_location)
    if state is None:  # only for "latest": a named tag that is nowhere raises NotFoundError
        raise NotFoundError(f"checkpoint {tag} not found in {' or '.join(urls)}")
    return state


def check_handles(handles: Any) -> None:
    """Re-raise the failure of a save that never reached the daemon's disk.

    A handle whose checkpoint was committed may still read "failed" once the checkpointer is
    closed (the connection drops before the "uploaded" event): the daemon owns it then, so that is
    not a lost checkpoint.
    """
    for h in handles:
        if h.state == "failed" and h.path is None:
            h.check()


def existing_tags(urls: list[str]) -> set[str]:
    """Tags with a manifest in any of ``urls``: one listing each, no manifest read.

    A save whose tag is here would collide (tags are never overwritten), so the integrations
    refuse it at ``save()`` time with a hint, instead of learning it from the daemon later.
    """
    from ..catalog import run_sync
    from ..storage import open_store

    async def one(url: str) -> set[str]:
        async with open_store(url) as store:
            objs = await store.list("checkpoints/")
        return {
            o.key.split("/")[1]
            for o in objs
            if o.key.count("/") == 2 and o.key.endswith("/MANIFEST.json")
        }

    tags: set[str] = set()
    for url in urls:
        try:
            tags |= run_sync(one(url))
        except (CkptdError, OSError) as e:
            log.warning("could not list %s: %s", url, e)
    return tags


def newest(
    urls: list[str], tag: str = "latest", map_location: Any = "cpu"
) -> dict[str, Any] | None:
    """``ckptd.load`` of the newest checkpoint of the run that verifies, over all of ``urls``
    (the daemon's root and the store; the root wins a tie, it is local). None: the run has none.

    The same rule as ``Checkpointer.restore`` (``reader.load_newest``), so every integration
    resumes from the same checkpoint.
    """
    from ..reader import load_newest

    return load_newest(urls, tag, map_location)


def delete_checkpoint(url: str, tag: str) -> bool:
    """Delete one checkpoint of the run at ``url``: its manifest first (it stops existing for
    every reader), then its files. False when it was not there."""
    import json

    from ..catalog import run_sync
    from ..storage import open_store

    async def go() -> bool:
        async with open_store(url) as store:
            key = join_key("checkpoints", tag, "MANIFEST.json")
            try:
                manifest = json.loads(await store.get_bytes(key))
            except (NotFoundError, FileNotFoundError):
                return False
            await store.delete(key)
            for name in manifest.get("files") or {}:
                if "/" not in name and not name.startswith("."):
                    await store.delete(join_key("checkpoints", tag, name))
            return True

    return run_sync(go())


def raise_failed(handles: Iterable[Any]) -> None:
    """Re-raise, without blocking, the first save that failed for real: one the daemon refused
    or could not store (a collision, a full disk, a failed upload), or one lost before it was
    committed. A daemon that went away after committing is not one: it resumes the upload."""
    for h in handles:
        error = getattr(h, "_error", None)
        if error is None:
            continue
        if isinstance(error, DaemonUnavailableError) and h.path is not None:
            continue
        h.check()
