"""A store on a local or mounted filesystem (``/path`` or ``file:///path``)."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading

import crc32c as _crc32c

from ..errors import IntegrityError, NotFoundError, PermanentStorageError, TransientStorageError
from .base import ObjectInfo, ProgressFn, Store

_CHUNK = 16 << 20


class LocalStore(Store):
    """Objects are files under ``root``; every write is temp file + fsync + rename."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.url = self.root

    def _path(self, key: str) -> str:
        path = os.path.normpath(os.path.join(self.root, key))
        if path != self.root and not path.startswith(self.root + os.sep):
            raise PermanentStorageError(f"key {key!r} escapes the store root {self.root}")
        return path

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
        dst = self._path(key)
        if os.path.abspath(path) == dst:
            return
        await asyncio.to_thread(_copy_verified, path, dst, size, crc32c, progress)

    async def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        dst = self._path(key)

        def write() -> None:
            if if_absent and os.path.exists(dst):
                raise FileExistsError(dst)
            _atomic_write(dst, data)

        await asyncio.to_thread(_translate, write)

    async def get_bytes(
        self, key: str, *, start: int | None = None, end: int | None = None
    ) -> bytes:
        src = self._path(key)

        def read() -> bytes:
            with open(src, "rb") as f:
                if start:
                    f.seek(start)
                return f.read() if end is None else f.read(end - (start or 0))

        return await asyncio.to_thread(_translate, read)

    async def get_file(self, key: str, path: str, *, size: int | None = None) -> None:
        src = self._path(key)
        await asyncio.to_thread(_translate, shutil.copyfile, src, path)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        def walk() -> list[ObjectInfo]:
            out: list[ObjectInfo] = []
            base = self.root
            start = os.path.join(base, os.path.dirname(prefix)) if "/" in prefix else base
            if not os.path.isdir(start):
                return out
            for dirpath, dirnames, filenames in os.walk(start):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for name in filenames:
                    full = os.path.join(dirpath, name)
                    key = os.path.relpath(full, base).replace(os.sep, "/")
                    if key.startswith(prefix) and ".tmp-" not in name:
                        try:
                            out.append(ObjectInfo(key, os.path.getsize(full)))
                        except FileNotFoundError:
                            continue
            return sorted(out, key=lambda o: o.key)

        return await asyncio.to_thread(walk)

    async def delete(self, key: str) -> None:
        dst = self._path(key)

        def rm() -> None:
            try:
                os.unlink(dst)
            except FileNotFoundError:
                return
            # Drop directories left empty, up to the store root.
            parent = os.path.dirname(dst)
            while parent != self.root and parent.startswith(self.root):
                try:
                    os.rmdir(parent)
                except OSError:
                    break
                parent = os.path.dirname(parent)

        await asyncio.to_thread(rm)


def _translate(fn, *args):  # type: ignore[no-untyped-def]
    try:
        return fn(*args)
    except FileExistsError:
        raise  # create-only write refused: not worth a retry
    except FileNotFoundError as e:
        raise NotFoundError(str(e)) from e
    except PermissionError as e:
        raise PermanentStorageError(str(e)) from e
    except OSError as e:
        raise TransientStorageError(str(e)) from e


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(dst: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    fsync_dir(os.path.dirname(dst))


def _copy_verified(src: str, dst: str, size: int, crc: int, progress: ProgressFn | None) -> None:
    try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = f"{dst}.tmp-{os.getpid()}-{threading.get_ident()}"
        value = 0
        n = 0
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            while chunk := fi.read(_CHUNK):
                value = _crc32c.crc32c(chunk, value)
                fo.write(chunk)
                n += len(chunk)
                if progress:
                    progress(len(chunk))
            fo.flush()
            os.fsync(fo.fileno())
        if n != size or value != crc:
            os.unlink(tmp)
            raise IntegrityError(
                f"{src} changed while uploading: {n} bytes crc32c {value:08x}, "
                f"expected {size} bytes crc32c {crc:08x}"
            )
        os.replace(tmp, dst)
        fsync_dir(os.path.dirname(dst))
    except (FileNotFoundError, PermissionError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise NotFoundError(str(e)) from e
        if isinstance(e, PermissionError):
            raise PermanentStorageError(str(e)) from e
        raise TransientStorageError(f"copy to {dst} failed: {e}") from e
