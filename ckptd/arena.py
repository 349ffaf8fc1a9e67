"""Shared-memory staging slots, handed to the daemon as file descriptors.

Each slot is an anonymous ``memfd`` mapped into the trainer and passed to the daemon over the Unix
socket (SCM_RIGHTS). Nothing has a name in /dev/shm, so a trainer that dies leaks nothing: the
memory goes away when the last process holding the descriptor lets go, after the daemon has
written what was staged. On CUDA the mapping is page-locked with ``cudaHostRegister`` so that
device-to-host copies run at full speed and asynchronously.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading

import torch

log = logging.getLogger("ckptd.arena")

_GRANULE = 2 << 20


class Slot:
    """One staging buffer. Grows by replacement: a new memfd, sent again to the daemon."""

    def __init__(self, index: int, label: str) -> None:
        self.index = index
        self.label = label
        self.fd = -1
        self.size = 0
        self.generation = 0
        self._mm: mmap.mmap | None = None
        self.buf: torch.Tensor | None = None  # uint8 view of the whole mapping
        self.pinned = False
        self.free = threading.Event()
        self.free.set()
        self.views: dict[object, tuple[list[int], list[torch.Tensor]]] = {}  # by file layout

    def fits(self, size: int) -> bool:
        return size <= self.size and self.fd >= 0

    def ensure(self, size: int, pin: bool) -> bool:
        """Make the slot at least ``size`` bytes; returns True when the fd changed."""
        if self.fits(size):
            return False
        self.release()
        new = max(_GRANULE, (size + size // 8 + _GRANULE - 1) // _GRANULE * _GRANULE)
        fd = os.memfd_create(f"ckptd-{self.label}-{self.index}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, new)
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mm = mmap.mmap(fd, new, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
        self.fd, self.size, self._mm = fd, new, mm
        self.buf = torch.frombuffer(mm, dtype=torch.uint8)
        self.generation += 1
        if pin:
            self._pin()
        return True

    def _pin(self) -> None:
        assert self.buf is not None
        err = torch.cuda.cudart().cudaHostRegister(self.buf.data_ptr(), self.size, 0)
        if int(err) != 0:
            log.warning("cudaHostRegister failed (%s); staging without pinned memory", err)
        else:
            self.pinned = True

    def release(self) -> None:
        self.views.clear()
        if self.pinned and self.buf is not None:
            torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
            self.pinned = False
        self.buf = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                # A view is still exported somewhere; the mapping goes when it is collected.
                log.debug("slot %d mapping still referenced", self.index)
            self._mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.size = 0


class Arena:
    """A fixed number of slots; ``acquire`` applies the backpressure policy."""

    def __init__(self, slots: int, label: str) -> None:
        self.slots = [Slot(i, label) for i in range(slots)]
        self._cv = threading.Condition()

    def acquire(self, block: bool, timeout: float | None = None) -> Slot | None:
        with self._cv:
            ok = self._cv.wait_for(
                lambda: any(s.free.is_set() for s in self.slots), timeout if block else 0
            )
            if not ok:
                return None
            slot = next(s for s in self.slots if s.free.is_set())
            slot.free.clear()
            return slot

    def release(self, index: int) -> None:
        with self._cv:
            if 0 <= index < len(self.slots):
                self.slots[index].free.set()
                self._cv.notify_all()

    def release_all(self) -> None:
        with self._cv:
            for s in self.slots:
                s.free.set()
            self._cv.notify_all()

    def close(self) -> None:
        for s in self.slots:
            s.release()
