"""A client's staging slot as the daemon holds it: its own descriptor, read with ``pread`` only.

The slot is shared memory that the client owns and can change, shrink or grow at any time. A
mapping of it would turn a shrink into SIGBUS for the whole daemon (every other client's pending
save with it) and would let bytes change between being checksummed and being written. So the
daemon never maps a slot: it copies each chunk into a buffer of its own with ``pread`` (a shrunk
slot reads short, which fails that one save), checksums that buffer and writes that buffer.

A ``SlotLease`` owns its duplicated descriptor and closes it on every path (a context manager),
so no exit path of a save can leak it.
"""

from __future__ import annotations

import os
from types import TracebackType

from ..errors import SaveError


class SlotLease:
    """The daemon's own reference to ``size`` bytes of a client's slot, alive until closed."""

    __slots__ = ("_fd", "label", "size")

    def __init__(self, fd: int, size: int, label: str = "slot") -> None:
        self._fd: int | None = os.dup(fd)  # the client may close or replace its slot meanwhile
        self.size = size
        self.label = label

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the slot's bytes at ``offset``; a slot that shrank fails the save."""
        if self._fd is None:
            raise SaveError(f"{self.label} was released before it was read")
        if offset < 0 or offset + len(out) > self.size:
            raise SaveError(f"{self.label}: bytes [{offset}, {offset + len(out)}) lie outside it")
        done = 0
        while done < len(out):
            n = os.preadv(self._fd, [out[done:]], offset + done)
            if n == 0:
                raise SaveError(
                    f"{self.label} shrank to {offset + done} bytes while it was being written "
                    "(the client changed its staging memory); this save is lost, nothing else"
                )
            done += n

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> SlotLease:
        return self

    def __exit__(
        self, tp: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class BytesSource:
    """Daemon-owned bytes read through the same interface (inline files, tests)."""

    __slots__ = ("_data", "size")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = memoryview(data).cast("B")
        self.size = len(self._data)

    def read_into(self, offset: int, out: memoryview) -> None:
        if offset < 0 or offset + len(out) > self.size:
            raise SaveError(f"bytes [{offset}, {offset + len(out)}) lie outside the source")
        out[:] = self._data[offset : offset + len(out)]


Source = SlotLease | BytesSource
