"""A store on a local or mounted filesystem (``/path`` or ``file:///path``).

Objects are regular files under ``root``. Every path below the root is opened one component at a
time relative to its parent's descriptor, with ``O_NOFOLLOW``: a symbolic link planted in the
store (a checkpoint directory pointing at ``/home``, a weight file pointing at a key) is never
followed, so reads, writes and deletes stay inside the root whatever the store holds. A link is
not an object: listings skip it and opening one fails. The root itself may be a link (it is the
user's own path).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import crc32c as _crc32c

from ..atomic import is_temp, temp_name
from ..errors import (
    AlreadyExistsError,
    IntegrityError,
    NotFoundError,
    PermanentStorageError,
    TransientStorageError,
)
from .base import ObjectInfo, ProgressFn, Store, preadv_crc, read_ranges_into

_CHUNK = 16 << 20
_READ_PART = 4 << 20  # per preadv of read_into: its CRC32C follows while it is in cache
_READ_THREADS = 2
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
T = TypeVar("T")


# ---- opening below a directory without following links ------------------------------------------


def key_parts(key: str) -> list[str]:
    """The components of a '/'-separated key; empty, ``.`` and ``..`` components are refused."""
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts):
        raise PermanentStorageError(f"key {key!r} is not a plain relative path")
    return parts


@contextlib.contextmanager
def dir_beneath(base: str, parts: Sequence[str], *, create: bool = False) -> Iterator[int]:
    """A descriptor of ``base/parts...``, opened without following a link below ``base``.

    Raises ``OSError`` as the kernel does: ``ELOOP`` for a link, ``ENOTDIR`` for a file,
    ``ENOENT`` for a missing directory (with ``create``, missing ones are made).
    """
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o777, dir_fd=fd)
            try:
                child = os.open(part, _DIR, dir_fd=fd)
            except NotADirectoryError:
                # Linux says ENOTDIR, not ELOOP, for a link opened with O_DIRECTORY|O_NOFOLLOW.
                if stat.S_ISLNK(os.lstat(part, dir_fd=fd).st_mode):
                    raise OSError(errno.ELOOP, "a symbolic link, never followed", part) from None
                raise
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def open_beneath(
    base: str, parts: Sequence[str], flags: int = os.O_RDONLY, mode: int = 0o644
) -> int:
    """A descriptor of the file ``base/parts...`` (flags as ``os.open``), no link followed."""
    with dir_beneath(base, parts[:-1]) as d:
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=d)


def is_link_refusal(e: OSError) -> bool:
    """Whether an open below a directory failed because a component is a symbolic link."""
    return e.errno == errno.ELOOP


# ---- the store -----------------------------------------------------------------------------------


class LocalStore(Store):
    """Objects are files under ``root``; every write is temp file + fsync + rename."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.url = self.root

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *key_parts(key))

    async def check_access(self) -> None:
        def probe() -> None:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as e:
                raise PermanentStorageError(
                    f"cannot create store directory {self.root}: {e}"
                ) from e
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise PermanentStorageError(f"store directory {self.root} is not writable")

        await asyncio.to_thread(probe)

    async def put_file(
        self,
        key: str,
        path: str,
        *,
        size: int,
        crc32c: int,
        journal: str | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        parts = key_parts(key)
        if os.path.abspath(path) == self._path(key):
            return  # the store is the daemon's root: the committed file is the object
        await asyncio.to_thread(
            self._translate, key, self._write, parts, _copy_from(path, size, crc32c, progress)
        )

    async def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        parts = key_parts(key)

        def fill(fd: int) -> None:
            _write_all(fd, data)

        await asyncio.to_thread(self._translate, key, self._write, parts, fill, if_absent)

    def _write(
        self, parts: list[str], fill: Callable[[int], None], if_absent: bool = False
    ) -> None:
        os.makedirs(self.root, exist_ok=True)
        name = parts[-1]
        with dir_beneath(self.root, parts[:-1], create=True) as d:
            tmp = temp_name(name)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o644, dir_fd=d)  # fmt: skip
            try:
                try:
                    fill(fd)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if if_absent:
                    _link_absent(tmp, name, d)
                else:
                    os.replace(tmp, name, src_dir_fd=d, dst_dir_fd=d)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=d)
            os.fsync(d)

    async def get_bytes(
        self, key: str, *, start: int | None = None, end: int | None = None
    ) -> bytes:
        parts = key_parts(key)

        def read() -> bytes:
            fd = open_beneath(self.root, parts)
            try:
                with os.fdopen(fd, "rb", closefd=False) as f:
                    if start:
                        f.seek(start)
                    return f.read() if end is None else f.read(max(0, end - (start or 0)))
            finally:
                os.close(fd)

        return await asyncio.to_thread(self._translate, key, read)

    async def get_file(self, key: str, path: str, *, size: int | None = None) -> None:
        parts = key_parts(key)

        def copy() -> None:
            fd = open_beneath(self.root, parts)
            with os.fdopen(fd, "rb") as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)

        await asyncio.to_thread(self._translate, key, copy)

    async def read_into(
        self,
        key: str,
        buf: memoryview,
        *,
        offset: int = 0,
        total: int | None = None,
        concurrency: int | None = None,
        part_size: int | None = None,
        progress: ProgressFn | None = None,
    ) -> int:
        """``Store.read_into`` with ``os.preadv`` straight into ``buf``, parts read and
        checksummed in worker threads (both release the GIL). The file is opened below the root
        without following links, and must be a regular file (a FIFO planted there fails)."""
        parts = key_parts(key)
        end = offset + len(buf)

        def opened() -> int:
            fd = open_beneath(self.root, parts, os.O_RDONLY | os.O_NONBLOCK)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise IntegrityError(f"{self.root}/{key}: not a regular file")
            if (total is not None and st.st_size != total) or st.st_size < end:
                os.close(fd)
                want = total if total is not None else f"at least {end}"
                raise IntegrityError(f"{self.root}/{key}: {st.st_size} bytes, expected {want}")
            return fd

        fd = await asyncio.to_thread(self._translate, key, opened)
        try:

            async def fetch(start: int, view: memoryview) -> int:
                return await asyncio.to_thread(
                    self._translate, key, preadv_crc, fd, view, start, key
                )

            return await read_ranges_into(
                buf, offset, part_size or _READ_PART, concurrency or _READ_THREADS, fetch, progress
            )
        finally:
            os.close(fd)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        def walk() -> list[ObjectInfo]:
            out: list[ObjectInfo] = []
            base = self.root
            under = [p for p in prefix.split("/")[:-1] if p]
            if any(p in (".", "..") for p in under) or not _plain_dirs(base, under):
                return out  # a link (or no directory) on the way: nothing of the store's there
            start = os.path.join(base, *under)
            for dirpath, dirnames, filenames in os.walk(start):  # never descends into links
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for name in filenames:
                    full = os.path.join(dirpath, name)
                    key = os.path.relpath(full, base).replace(os.sep, "/")
                    if not key.startswith(prefix) or is_temp(name):
                        continue
                    try:
                        st = os.lstat(full)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISREG(st.st_mode):  # a link is not an object
                        out.append(ObjectInfo(key, st.st_size, st.st_mtime))
            return sorted(out, key=lambda o: o.key)

        return await asyncio.to_thread(walk)

    async def delete(self, key: str) -> None:
        parts = key_parts(key)

        def rm() -> None:
            try:
                with dir_beneath(self.root, parts[:-1]) as d:
                    os.unlink(parts[-1], dir_fd=d)
            except FileNotFoundError:
                return
            except NotADirectoryError:
                return  # a file where a directory of the key would be: the key is not there
            # Drop directories left empty, up to the store root (never through a link).
            for i in range(len(parts) - 1, 0, -1):
                try:
                    with dir_beneath(self.root, parts[: i - 1]) as d:
                        os.rmdir(parts[i - 1], dir_fd=d)
                except OSError:
                    break

        await asyncio.to_thread(self._translate, key, rm)

    def _translate(self, key: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except FileExistsError as e:
            raise AlreadyExistsError(f"{self.root}/{key} exists: {e}") from e
        except (FileNotFoundError, NotADirectoryError) as e:
            raise NotFoundError(f"{self.root}/{key}: {e}") from e
        except PermissionError as e:
            raise PermanentStorageError(f"{self.root}/{key}: {e}") from e
        except OSError as e:
            if is_link_refusal(e):
                raise PermanentStorageError(
                    f"{self.root}/{key}: a symbolic link is in the way; the local store never "
                    "follows one"
                ) from e
            raise TransientStorageError(f"{self.root}/{key}: {e}") from e


def _plain_dirs(base: str, parts: list[str]) -> bool:
    """Whether ``base/parts...`` is a chain of real directories (no link anywhere below base)."""
    path = base
    for part in parts:
        path = os.path.join(path, part)
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return False
        except FileNotFoundError:
            return False
    return os.path.isdir(base)


def _link_absent(tmp: str, name: str, d: int) -> None:
    """Create-only rename: a hard link fails if ``name`` exists, where a rename would replace."""
    try:
        os.link(tmp, name, src_dir_fd=d, dst_dir_fd=d, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as e:  # a filesystem without hard links: check, then rename
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
        try:
            os.stat(name, dir_fd=d, follow_symlinks=False)
        except FileNotFoundError:
            os.replace(tmp, name, src_dir_fd=d, dst_dir_fd=d)
            return
        raise FileExistsError(name) from None


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _copy_from(src: str, size: int, crc: int, progress: ProgressFn | None) -> Callable[[int], None]:
    """A ``fill`` that copies ``src`` and checks what it copied against ``size`` and ``crc``."""

    def fill(fd: int) -> None:
        value = 0
        n = 0
        with open(src, "rb") as fi:
            while chunk := fi.read(_CHUNK):
                value = _crc32c.crc32c(chunk, value)
                _write_all(fd, chunk)
                n += len(chunk)
                if progress:
                    progress(len(chunk))
        if n != size or value != crc:
            raise IntegrityError(
                f"{src} changed while uploading: {n} bytes crc32c {value:08x}, "
                f"expected {size} bytes crc32c {crc:08x}"
            )

    return fill
