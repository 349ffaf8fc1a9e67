"""Recovery: what a daemon does with its root before it serves anyone.

The daemon's state is on disk, so a start after a crash is the same as any start: take the root's
lock (one daemon per root), remove what a crash left half-written, and find the uploads that are
still owed. Only directories that are certainly torn are removed: a ``<tag>.partial`` directory,
or a directory directly under ``checkpoints/`` that has no manifest and holds only files (a
checkpoint never has subdirectories). Anything else unexpected is logged and left alone, so a
layout the rescan does not understand costs a warning, never a committed checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from dataclasses import dataclass

from ..errors import ConfigError, IntegrityError
from ..manifest import MAX_MANIFEST_BYTES, parse
from ..names import check_name
from .commit import checkpoint_dir
from .upload import clear_record, pending_records

log = logging.getLogger("ckptd.daemon")

_MAX_DEPTH = 12


@dataclass(frozen=True, slots=True)
class Owed:
    """A committed checkpoint whose upload did not finish before the daemon stopped."""

    run: str
    tag: str
    store: str
    step: int


def prepare_root(root: str, *, gid: int | None) -> int:
    """Create the root, check it, and take its lock; returns the lock's fd (held for life).

    Everything the daemon creates is owner-only, or group-readable when ``gid`` is given.
    """
    os.umask(0o027 if gid is not None else 0o077)
    try:
        os.makedirs(os.path.join(root, ".ckptd"), exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create root {root}: {e.strerror}") from e
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError(f"root {root} is not writable by this user")
    if gid is not None:
        with contextlib.suppress(PermissionError):
            os.chown(root, -1, gid)
    elif os.stat(root).st_mode & 0o077:
        log.warning("root %s is readable by other users; `chmod go-rwx` it (or pass --group)", root)
    fd = os.open(os.path.join(root, ".ckptd", "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(
            f"another ckptd daemon (pid {other}) already serves root {root}; "
            "stop it or use another --root"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def read_manifest_step(root: str, run: str, tag: str) -> int:
    """The step of a committed local checkpoint; raises ``IntegrityError``/``OSError``."""
    path = os.path.join(checkpoint_dir(root, run, tag), "MANIFEST.json")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    return int(parse(raw, tag=tag, where=f"{run}@{tag}")["step"])


def latest_step(root: str, run: str) -> int:
    """The step of the checkpoint ``<run>/latest`` names, or -1."""
    try:
        with open(os.path.join(root, run, "latest")) as f:
            tag = f.read(256).strip()
        return read_manifest_step(root, run, tag)
    except (OSError, IntegrityError, ValueError):
        return -1


def _torn(path: str) -> bool:
    """A directory under ``checkpoints/`` that a crash left: no manifest, and files only."""
    if os.path.lexists(os.path.join(path, "MANIFEST.json")):
        return False
    with os.scandir(path) as entries:
        return all(e.is_file(follow_symlinks=False) for e in entries)


def rescan(root: str) -> list[Owed]:
    """Remove what a crash left half-written; return the uploads still owed."""
    committed = removed = 0
    for dirpath, dirnames, _ in os.walk(root):
        depth = dirpath[len(root) :].count(os.sep)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "experiment"]
        if depth > _MAX_DEPTH:
            dirnames[:] = []
            continue
        if os.path.basename(dirpath) != "checkpoints":
            continue
        for name in list(dirnames):
            path = os.path.join(dirpath, name)
            if name.endswith(".partial") or _torn(path):
                log.warning("removing incomplete checkpoint directory %s", path)
                shutil.rmtree(path, ignore_errors=True)
                dirnames.remove(name)
                removed += 1
            elif os.path.lexists(os.path.join(path, "MANIFEST.json")):
                dirnames.remove(name)  # a checkpoint: nothing below it to walk
                committed += 1
            # else: a directory with subdirectories and no manifest is not a checkpoint (an old
            # run whose name had a part called "checkpoints"): walk on, delete nothing.
    parts = os.path.join(root, ".ckptd", "parts")
    if os.path.isdir(parts):
        # Parts of sharded saves that were in flight: their ranks saw the daemon go and their
        # saves failed, so no commit will ever list them.
        log.warning("removing parts of unfinished sharded saves in %s", parts)
        shutil.rmtree(parts, ignore_errors=True)
    owed: list[Owed] = []
    for run, tag, store in pending_records(root):
        try:
            check_name(run, "run")
            check_name(tag, "tag")
            step = read_manifest_step(root, run, tag)
        except FileNotFoundError:
            clear_record(root, run, tag)
            continue
        except (OSError, IntegrityError, ConfigError, ValueError) as e:
            log.error("checkpoint %s@%s in %s has a bad manifest (%s); not uploading it",
                      run, tag, root, e)  # fmt: skip
            continue
        owed.append(Owed(run, tag, store, step))
    log.info(
        "root %s: %d committed checkpoint(s), %d incomplete removed, %d upload(s) to resume",
        root, committed, removed, len(owed),
    )  # fmt: skip
    return owed
