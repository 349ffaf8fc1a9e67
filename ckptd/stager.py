"""Copy a planned save into its arena slot: the only work ``save()`` does on the loop's time.

CPU tensors are copied at once (``torch._foreach_copy_``, which releases the GIL per kernel;
thousands of small ones are split across a few threads).
CUDA tensors are copied device-to-host into the pinned slot asynchronously: module buffers and
extras on the current stream (so the next forward, which may update running statistics, is
ordered after the copy), parameters and optimizer state on a side stream that first waits for the
current one, so the copy overlaps the next forward/backward. The returned ``Fence`` is what the
next ``optimizer.step`` waits on (GPU-side, the CPU is not blocked) and what the sender thread
waits on before telling the daemon the slot is ready.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from operator import attrgetter

import torch

from .arena import Slot
from .fmt import TORCH_DTYPES, FilePlan, SavePlan, pick_in_order

_IS_CPU = attrgetter("is_cpu")


class Fence:
    """Completion of one staging copy. Already complete for CPU-only state."""

    def __init__(self, events: list[torch.cuda.Event] | None = None) -> None:
        self._events = events or []

    @property
    def is_async(self) -> bool:
        return bool(self._events)

    def synchronize(self) -> None:
        """Block the calling CPU thread until the copy has landed in the slot."""
        for e in self._events:
            e.synchronize()

    def gpu_wait(self) -> None:
        """Make the current CUDA stream wait for the copy (no CPU blocking)."""
        if self._events:
            stream = torch.cuda.current_stream()
            for e in self._events:
                stream.wait_event(e)

    def done(self) -> bool:
        return all(e.query() for e in self._events)


class Stager:
    def __init__(self) -> None:
        self._side: torch.cuda.Stream | None = None

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._side is None or self._side.device != device:
            self._side = torch.cuda.Stream(device=device)
        return self._side

    def stage(self, plan: SavePlan, slot: Slot) -> Fence:
        with torch.no_grad():  # sources may be live parameters that require grad
            return self._stage(plan, slot)

    def _stage(self, plan: SavePlan, slot: Slot) -> Fence:
        cpu_dst: list[torch.Tensor] = []
        cpu_src: list[torch.Tensor] = []
        cuda_now: list[tuple[torch.Tensor, torch.Tensor]] = []
        cuda_side: list[tuple[torch.Tensor, torch.Tensor]] = []
        for f in plan.files:
            if f.reuse is not None:  # unchanged, and stored already: nothing to copy
                continue
            index, views = _views(slot, f)
            srcs = f.srcs if len(index) == len(f.srcs) else pick_in_order(f.srcs, index)
            if all(map(_IS_CPU, srcs)):  # the common case, in one pass with no Python frame
                cpu_dst.extend(views)
                cpu_src.extend(srcs)
                continue
            if not any(src.is_cuda for src in srcs):
                # Other accelerators (neither CPU nor CUDA) take a plain, blocking copy.
                cpu_dst.extend(views)
                cpu_src.extend(src if src.is_cpu else src.cpu() for src in srcs)
                continue
            for i, dst, src in zip(index, views, srcs, strict=True):
                if src.is_cuda:
                    name = f"{f.name}/{f.tensors[i].name}"
                    (cuda_now if name in plan.sync_names else cuda_side).append((dst, src))
                else:
                    cpu_dst.append(dst)
                    cpu_src.append(src if src.is_cpu else src.cpu())
        if cpu_dst:
            copy_all(cpu_dst, cpu_src)
        events: list[torch.cuda.Event] = []
        if cuda_now or cuda_side:
            device = (cuda_now or cuda_side)[0][1].device
            current = torch.cuda.current_stream(device)
            for dst, src in cuda_now:
                dst.copy_(src, non_blocking=True)
            if cuda_now:
                ev = torch.cuda.Event()
                ev.record(current)
                events.append(ev)
            if cuda_side:
                side = self._side_stream(device)
                side.wait_stream(current)
                with torch.cuda.stream(side):
                    for dst, src in cuda_side:
                        dst.copy_(src, non_blocking=True)
                        src.record_stream(side)
                    ev = torch.cuda.Event()
                    ev.record(side)
                events.append(ev)
        return Fence(events)


def _views(slot: Slot, f: FilePlan) -> tuple[list[int], list[torch.Tensor]]:
    """Typed views of the slot for each non-empty tensor of ``f``, built once per (slot, layout)."""
    cached = slot.views.get(f)
    if cached is None:
        buf = slot.buf
        assert buf is not None
        if len(slot.views) > 16:  # layouts that keep changing: do not hoard views
            slot.views.clear()
        index: list[int] = []
        views: list[torch.Tensor] = []
        for i, ts in enumerate(f.tensors):
            n = ts.end - ts.begin
            if n == 0:
                continue
            v = buf[ts.arena_offset : ts.arena_offset + n].view(TORCH_DTYPES[ts.dtype])
            index.append(i)
            views.append(v.view(ts.shape))
        cached = slot.views[f] = (index, views)
    return cached


_PARALLEL_MIN = 1024  # tensors per thread: below this a second thread costs more than it saves
_MAX_THREADS = 4
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """Copy ``src`` into ``dst``; thousands of small tensors are split across threads.

    A small tensor's copy is mostly per-call overhead in C++ that holds no lock, and
    ``_foreach_copy_`` releases the GIL: with 10,000 tensors two threads copy in ~0.6 of the
    time of one. Large tensors gain nothing (torch already splits each copy across cores), and
    there are few of them, so the split is by count.
    """
    n = min(len(dst) // _PARALLEL_MIN, torch.get_num_threads(), _MAX_THREADS)
    if n < 2:
        _copy_chunk(dst, src)
        return
    pool = _thread_pool()
    step = -(-len(dst) // n)
    futures = [
        pool.submit(_copy_chunk, dst[i : i + step], src[i : i + step])
        for i in range(step, len(dst), step)
    ]
    try:
        _copy_chunk(dst[:step], src[:step])
    finally:
        for f in futures:
            f.result()


def _copy_chunk(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    with torch.no_grad():  # grad mode is per thread: sources may be parameters that require grad
        try:
            torch._foreach_copy_(dst, src)
        except (RuntimeError, TypeError):
            for d, s in zip(dst, src, strict=True):
                d.copy_(s)


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_MAX_THREADS - 1, thread_name_prefix="ckptd-copy")
        return _pool


def _forget_pool() -> None:
    """A forked child has none of the parent's threads: a new pool, if it ever saves."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)
