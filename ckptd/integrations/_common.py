"""Pieces the framework integrations share: tags from file names, and plain extras."""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

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
    """``ckptd.load`` of ``tag`` from the first of ``urls`` that has it."""
    from ..errors import NotFoundError
    from ..reader import load

    errors = []
    for url in urls:
        try:
            return load(url, tag=tag, map_location=map_location)
        except (NotFoundError, FileNotFoundError) as e:
            errors.append(f"{url}: {e}")
    raise NotFoundError(f"checkpoint {tag} not found: " + "; ".join(errors))


def check_handles(handles: Any) -> None:
    """Re-raise the failure of a save that never reached the daemon's disk.

    A handle whose checkpoint was committed may still read "failed" once the checkpointer is
    closed (the connection drops before the "uploaded" event): the daemon owns it then, so that is
    not a lost checkpoint.
    """
    for h in handles:
        if h.state == "failed" and h.path is None:
            h.check()
