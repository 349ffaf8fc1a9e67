"""Giving up an owed upload on purpose (``ckptd abandon RUN[@TAG]``), on disk.

An owed upload is its record ``<root>/.ckptd/uploads/<run>/<tag>.json`` (see ``upload``).
Abandoning writes ``<root>/.ckptd/abandoned/<run>/<tag>.json`` (the store, when and by whom)
and then removes the record, so a restarted daemon does not owe it again; the checkpoint's
local copy stays, and local retention never deletes an abandoned copy. A running daemon notices
the marker within a second (``UploadStage``), stops uploading it and ends the job as dropped,
so ``drain`` and ``exec`` stop waiting for it. The disk is the one channel: it works the same
whether a daemon runs or not, and survives a crash between the two steps (the marker wins).
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from ..atomic import write_atomic
from ..names import check_name
from .upload import pending_records, record_path

__all__ = ["abandon", "abandoned_path", "abandoned_tags", "is_abandoned"]


def abandoned_path(root: str, run: str, tag: str) -> str:
    uploads = os.path.join(root, ".ckptd", "uploads")
    rel = os.path.relpath(record_path(root, run, tag), uploads)
    return os.path.join(root, ".ckptd", "abandoned", rel)


def is_abandoned(root: str, run: str, tag: str) -> bool:
    return os.path.exists(abandoned_path(root, run, tag))


def abandoned_tags(root: str, run: str) -> set[str]:
    """Tags of ``run`` whose upload was abandoned (their local copies are kept)."""
    d = os.path.dirname(abandoned_path(root, run, "x"))
    try:
        return {n[: -len(".json")] for n in os.listdir(d) if n.endswith(".json")}
    except FileNotFoundError:
        return set()


def abandon(root: str, run: str, tag: str | None, *, by: str) -> list[tuple[str, str, str]]:
    """Abandon the owed uploads of ``run`` (one ``tag``, or all of them); returns the (run,
    tag, store) abandoned. Names are checked before any path is built."""
    check_name(run, "run")
    if tag is not None:
        check_name(tag, "tag")
    done = []
    for r, t, store in pending_records(root):
        if r != run or (tag is not None and t != tag):
            continue
        path = abandoned_path(root, r, t)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        marker = {"store": store, "abandoned_at": time.time(), "by": by}
        write_atomic(path, json.dumps(marker).encode())
        with contextlib.suppress(FileNotFoundError):  # the daemon finished it meanwhile
            os.unlink(record_path(root, r, t))
        done.append((r, t, store))
    return done
