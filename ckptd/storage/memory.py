"""An in-memory store for unit tests (``memory://name``).

Stores with the same name share their objects (a process-wide registry), so a test can write
through one store object and read through another built from the same URL, as the daemon and
``ckptd.load`` would. ``MemoryStore.clear()`` forgets everything.
"""

from __future__ import annotations

import asyncio
import threading
from typing import ClassVar

import crc32c as _crc32c

from ..errors import AlreadyExistsError, ConfigError, IntegrityError, NotFoundError
from .base import ObjectInfo, ProgressFn, Store

_CHUNK = 8 << 20


class MemoryStore(Store):
    """Objects live in a dict shared by every ``MemoryStore`` of the same name."""

    _registry: ClassVar[dict[str, dict[str, bytes]]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, url: str) -> None:
        if not url.startswith("memory://"):
            raise ConfigError(f"not a memory store URL: {url!r} (expected memory://NAME)")
        self.url = url
        self.name = url[len("memory://") :].strip("/")
        with self._lock:
            self._objects = self._registry.setdefault(self.name, {})

    @classmethod
    def clear(cls, name: str | None = None) -> None:
        """Forget the objects of one store name, or of all of them."""
        with cls._lock:
            for key, objects in cls._registry.items():
                if name is None or key == name:
                    objects.clear()

    async def check_access(self) -> None:
        return None

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
        def read() -> bytes:
            parts: list[bytes] = []
            value = 0
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    value = _crc32c.crc32c(chunk, value)
                    parts.append(chunk)
            data = b"".join(parts)
            if len(data) != size or value != crc32c:
                raise IntegrityError(
                    f"{path} changed before upload: {len(data)} bytes crc32c {value:08x}, "
                    f"expected {size} bytes crc32c {crc32c:08x}"
                )
            return data

        try:
            data = await asyncio.to_thread(read)
        except FileNotFoundError as e:
            raise NotFoundError(str(e)) from e
        self._objects[key] = data
        if progress:
            progress(len(data))

    async def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        if if_absent and key in self._objects:
            raise AlreadyExistsError(f"{self.url}/{key}")
        self._objects[key] = bytes(data)

    async def get_bytes(
        self, key: str, *, start: int | None = None, end: int | None = None
    ) -> bytes:
        try:
            data = self._objects[key]
        except KeyError:
            raise NotFoundError(f"{self.url}/{key}") from None
        return data[start or 0 : end]

    async def get_file(self, key: str, path: str, *, size: int | None = None) -> None:
        data = await self.get_bytes(key)

        def write() -> None:
            with open(path, "wb") as f:
                f.write(data)

        await asyncio.to_thread(write)

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
        try:
            data = self._objects[key]
        except KeyError:
            raise NotFoundError(f"{self.url}/{key}") from None
        end = offset + len(buf)
        if (total is not None and len(data) != total) or len(data) < end:
            raise IntegrityError(f"{self.url}/{key}: {len(data)} bytes, expected {total or end}")
        view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        view[:] = memoryview(data)[offset:end]
        if progress:
            progress(len(view))
        return await asyncio.to_thread(_crc32c.crc32c, view)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        return sorted(
            (ObjectInfo(k, len(v)) for k, v in list(self._objects.items()) if k.startswith(prefix)),
            key=lambda o: o.key,
        )

    async def delete(self, key: str) -> None:
        self._objects.pop(key, None)
