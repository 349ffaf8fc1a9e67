"""Atomic files: one temporary-name rule and one write helper, for every writer and listing.

A file is written under ``temp_name(path)`` (same directory, so the rename is atomic), fsynced,
renamed into place, and the directory fsynced. Every listing skips names ``is_temp`` accepts,
and the name rule refuses them as run, tag or file names, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading

TEMP_MARK = ".tmp-"
_counter = itertools.count()


def temp_name(path: str) -> str:
    """A name beside ``path`` unique to this process, thread and call."""
    return f"{path}{TEMP_MARK}{os.getpid()}-{threading.get_ident()}-{next(_counter)}"


def is_temp(name: str) -> bool:
    return TEMP_MARK in os.path.basename(name)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int = 0o666, *, sync_dir: bool = True) -> None:
    """Temp name, fsync, rename, fsync the directory; a failure leaves no temp file behind.
    ``mode`` is filtered by the umask (the daemon's is owner-only by default). ``sync_dir=False``
    skips the directory fsync for files that are only a hint after a crash (upload journals,
    written once per part: a lost rename only means starting that upload over)."""
    tmp = temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
        try:
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(os.path.dirname(path) or ".")
