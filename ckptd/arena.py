"""Shared-memory staging slots, handed to the daemon as file descriptors.

Each slot is torch's own file-descriptor shared memory (a /dev/shm file unlinked at creation,
kept open by its descriptor) and that descriptor is passed to the daemon over the Unix socket
(SCM_RIGHTS). Nothing keeps a name, so a trainer that dies leaks nothing: the memory goes away when
the last process holding a descriptor lets go, after the daemon has written what was staged.
Being torch's shared memory matters: a staged tensor handed to another process through
``torch.multiprocessing`` (DCP's process-mode ``async_save``) is shared in place, where torch would
otherwise move the storage into new shared memory behind the daemon's back (or crash doing it on a
foreign mapping). On CUDA the memory is page-locked with ``cudaHostRegister`` so that
device-to-host copies run at full speed and asynchronously.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

log = logging.getLogger("ckptd.arena")

_GRANULE = 2 << 20


def _shared_storage(size: int) -> torch.UntypedStorage:
    """``size`` bytes of torch's file-descriptor shared memory (its pages not yet faulted in)."""
    new = getattr(torch.UntypedStorage, "_new_using_fd_cpu", None)
    if new is not None:
        return new(size)
    # Public path: allocates privately first, then moves into shared memory (one extra copy).
    return torch.empty(size, dtype=torch.uint8).share_memory_().untyped_storage()


class Slot:
    """One staging buffer. Grows by replacement: a new memfd, sent again to the daemon."""

    def __init__(self, index: int, label: str) -> None:
        self.index = index
        self.label = label
        self.fd = -1  # our own duplicate of the storage's descriptor: what the daemon gets
        self.size = 0
        self.generation = 0
        self.buf: torch.Tensor | None = None  # uint8 view of the whole storage
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
        try:
            storage = _shared_storage(new)
        except RuntimeError as e:  # /dev/shm too small or out of memory
            raise OSError(f"cannot allocate a {new} byte staging slot in shared memory: {e}") from e
        fd = os.dup(storage._share_fd_cpu_()[0])
        os.set_inheritable(fd, False)
        self.fd, self.size = fd, new
        self.buf = torch.empty(0, dtype=torch.uint8).set_(storage)
        self.buf.zero_()  # fault every page in now, not during the first timed copy
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
        self.buf = None  # views still held elsewhere keep the storage alive until collected
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
