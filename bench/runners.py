"""One function per contender. Each returns plain numbers (seconds, bytes) for the report.

Rules every runner follows, so that the figures compare:
  * ``settle()`` before each timed call: the device is idle and no dirty pages are pending.
  * Blocking time is what the training loop waits for: the call until it returns, plus whatever
    the loop must still wait before it may change the state again (DCP's staging on CPU).
  * Nothing is skipped that a real save does: ckptd saves are committed (``wait("committed")``)
    in the timed run and the last one is loaded back and compared bit for bit; DCP futures and
    torch.save threads are joined before the next repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import mmap
import os
import shutil
import statistics
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import ckptd
from ckptd.compare import bitwise_equal

from .infra import Infra, settle
from .states import State

now = time.perf_counter


@dataclass
class Ctx:
    infra: Infra
    state: State
    repeats: int

    @property
    def device(self) -> torch.device:
        return self.state.device


# ---- the limit: a copy into preallocated shared memory ---------------------------------------


class ShmBuffer:
    """A memfd the size of the state, mapped and faulted in, with one view per tensor.

    On CUDA the mapping is page-locked (``cudaHostRegister``), as ckptd's arena is, and the copy
    is a device-to-host ``copy_(non_blocking=True)`` per tensor followed by a synchronize.
    """

    def __init__(self, tensors: list[torch.Tensor], pin: bool) -> None:
        sizes = [t.numel() * t.element_size() for t in tensors]
        offsets, n = [], 0
        for s in sizes:
            offsets.append(n)
            n += (s + 63) // 64 * 64
        self.nbytes = sum(sizes)
        self.size = max(n, 4096)
        self.fd = os.memfd_create("ckptd-bench-limit", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        self.mm: mmap.mmap | None = mmap.mmap(self.fd, self.size, flags=flags)
        buf = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.pinned = False
        if pin:
            err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), self.size, 0)
            self.pinned = int(err) == 0
        self.buf: torch.Tensor | None = buf
        self.views = [
            buf[o : o + s].view(t.dtype).view(t.shape)
            for o, s, t in zip(offsets, sizes, tensors, strict=True)
        ]

    def copy(self, tensors: list[torch.Tensor]) -> None:
        if tensors and tensors[0].is_cuda:
            for d, s in zip(self.views, tensors, strict=True):
                d.copy_(s, non_blocking=True)
            torch.cuda.synchronize()
        else:
            torch._foreach_copy_(self.views, tensors)

    def write_to(self, path: str) -> None:
        """Sequential write of the bytes + fsync: the disk's limit for a durable checkpoint."""
        assert self.mm is not None
        view = memoryview(self.mm)[: self.nbytes]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            pos = 0
            while pos < len(view):
                pos += os.write(fd, view[pos : pos + (64 << 20)])
            os.fsync(fd)
        finally:
            os.close(fd)
            view.release()

    def close(self) -> None:
        if self.pinned and self.buf is not None:
            torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
        self.views, self.buf = [], None
        gc.collect()
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def run_limit(ctx: Ctx) -> tuple[dict[str, Any], ShmBuffer]:
    """The shared-memory buffer of the copy limit, warmed up; ``run_ckptd`` times it."""
    tensors = ctx.state.tensors()
    buf = ShmBuffer(tensors, pin=ctx.device.type == "cuda")
    settle(ctx.device)
    t0 = now()
    buf.copy(tensors)  # first run: faults nothing (MAP_POPULATE) but warms caches and views
    first = now() - t0
    return {"first": first, "pinned": buf.pinned}, buf


def limit_copy(ctx: Ctx, buf: ShmBuffer, tensors: list[torch.Tensor]) -> float:
    settle(ctx.device)
    t0 = now()
    buf.copy(tensors)
    return now() - t0


def raw_write(ctx: Ctx, buf: ShmBuffer, i: int) -> float:
    path = ctx.infra.path("raw", f"raw-{i}.bin")
    settle()
    t0 = now()
    buf.write_to(path)
    took = now() - t0
    os.unlink(path)
    return took


# ---- torch.save ----------------------------------------------------------------------------


def run_torch_save(ctx: Ctx) -> dict[str, Any]:
    times, size = [], 0
    for i in range(ctx.repeats):
        path = ctx.infra.path("torch_save", f"ckpt-{i}.pt")
        settle(ctx.device)
        t0 = now()
        torch.save(ctx.state.snapshot(), path)
        times.append(now() - t0)
        size = os.path.getsize(path)
        settle()  # its dirty pages go to disk before the next measurement, not during it
        os.unlink(path)
    return {"blocking": times, "file_bytes": size}


def clone_to_cpu(tree: Any, memo: dict[Any, torch.Tensor] | None = None) -> Any:
    """A CPU copy of a state tree; tensors that share memory (tied weights) stay shared."""
    memo = {} if memo is None else memo
    if isinstance(tree, torch.Tensor):
        key = (tree.untyped_storage().data_ptr(), tree.storage_offset(), tuple(tree.shape))
        if key not in memo:
            memo[key] = tree.detach().to("cpu", copy=True)
        return memo[key]
    if isinstance(tree, dict):
        return {k: clone_to_cpu(v, memo) for k, v in tree.items()}
    if isinstance(tree, list):
        return [clone_to_cpu(v, memo) for v in tree]
    if isinstance(tree, tuple):
        return tuple(clone_to_cpu(v, memo) for v in tree)
    return tree


def run_torch_save_thread(ctx: Ctx) -> dict[str, Any]:
    """The common hand-rolled async save: clone on the loop, ``torch.save`` in a thread."""
    blocking, total = [], []
    for i in range(ctx.repeats):
        path = ctx.infra.path("torch_save_thread", f"ckpt-{i}.pt")
        settle(ctx.device)
        t0 = now()
        snap = clone_to_cpu(ctx.state.snapshot())
        th = threading.Thread(target=torch.save, args=(snap, path), daemon=True)
        th.start()
        blocking.append(now() - t0)
        th.join()
        total.append(now() - t0)
        del snap
        settle()
        os.unlink(path)
    return {"blocking": blocking, "done": total}


# ---- torch.distributed.checkpoint ----------------------------------------------------------


def dcp_stager(kind: str, device: torch.device) -> Any:
    """None for DCP's default staging; else its ``DefaultStager`` (shared memory, and on CUDA
    pinned memory with asynchronous, non-blocking staging). None where this torch lacks it."""
    if kind == "default":
        return None
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    except ImportError:
        return None
    cuda = device.type == "cuda"
    return DefaultStager(
        StagingOptions(
            use_pinned_memory=cuda,
            use_shared_memory=True,
            use_async_staging=cuda,
            use_non_blocking_copy=cuda,
        )
    )


def has_dcp_stager() -> bool:
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions  # noqa: F401
    except ImportError:
        return False
    return True


class DcpSaver:
    """``dcp.async_save`` in thread mode on a single process (``no_dist``), one folder per save."""

    def __init__(self, ctx: Ctx, kind: str, folder: str) -> None:
        import torch.distributed.checkpoint as dcp

        self.dcp, self.ctx, self.kind = dcp, ctx, kind
        self.stager = dcp_stager(kind, ctx.device)
        self.folder = folder
        self.pending: Any = None
        self.n = 0

    def save(self) -> Any:
        self.n += 1
        path = os.path.join(self.folder, f"ckpt-{self.n % 2}")
        shutil.rmtree(path, ignore_errors=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.dcp.async_save(
                self.ctx.state.snapshot(),
                checkpoint_id=path,
                no_dist=True,
                async_stager=self.stager,
            )

    @staticmethod
    def staged(res: Any) -> None:
        if hasattr(res, "staging_completion"):
            res.staging_completion.result()

    @staticmethod
    def done(res: Any) -> None:
        if hasattr(res, "upload_completion"):
            res.upload_completion.result()
        else:
            res.result()

    def close(self) -> None:
        if self.pending is not None:
            self.done(self.pending)
            self.pending = None
        if self.stager is not None:
            self.stager.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def run_dcp(ctx: Ctx, kind: str) -> dict[str, Any]:
    saver = DcpSaver(ctx, kind, ctx.infra.path(f"dcp-{kind}", ""))
    returned, blocking, total = [], [], []
    try:
        for _ in range(ctx.repeats):
            settle(ctx.device)
            t0 = now()
            res = saver.save()
            returned.append(now() - t0)
            if ctx.device.type == "cpu":
                saver.staged(res)  # on CPU the loop may not touch the state before this
            blocking.append(now() - t0)
            saver.done(res)
            total.append(now() - t0)
            settle()
    finally:
        saver.close()
    return {"blocking": blocking, "returned": returned, "done": total}


# ---- ckptd ---------------------------------------------------------------------------------


@dataclass
class CkptdRun:
    ckpt: ckptd.Checkpointer
    root: str
    run: str
    state: State
    step: int = 0
    last_tag: str = ""

    def save(self) -> ckptd.SaveHandle:
        self.step += 1
        h = self.ckpt.save(self.step, model=self.state.model, optimizer=self.state.optimizer)
        self.last_tag = h.tag
        return h


def _wait_slots_grown(ck: ckptd.Checkpointer, timeout: float = 120.0) -> None:
    """After the first save, ckptd grows its other slots in a background thread; let it finish
    so that it does not compete with the timed saves (it is a one-off cost, reported as such)."""
    slots = getattr(getattr(ck, "_arena", None), "slots", None)
    if not slots:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        want = max(s.size for s in slots)
        if all(s.size >= want and s.free.is_set() for s in slots):
            return
        time.sleep(0.01)


def start_ckptd(ctx: Ctx, socket: str, root: str, run: str) -> CkptdRun:
    ck = ckptd.Checkpointer(run, socket=socket)
    return CkptdRun(ck, root, run, ctx.state)


def run_ckptd(ctx: Ctx, cr: CkptdRun, buf: ShmBuffer, raw: bool = False) -> dict[str, Any]:
    """Blocking time of ``save()`` and save -> committed (then call ``verify_ckptd``).

    Each timed save follows a timed copy of the same tensors into ``buf`` (the copy limit) and,
    with ``raw``, a raw write + fsync of those bytes (the disk's limit): each limit is measured
    side by side with the figure it bounds. On a shared VM, CPU and disk speed drift over a run
    by more than the differences being measured.
    """
    tensors = ctx.state.tensors()
    settle(ctx.device)
    t0 = now()
    h = cr.save()
    first = now() - t0
    h.wait("committed", timeout=600)
    first_committed = now() - t0
    _wait_slots_grown(cr.ckpt)
    blocking, committed, limit, raw_times = [], [], [], []
    for i in range(ctx.repeats):
        ctx.state.touch()
        limit.append(limit_copy(ctx, buf, tensors))
        if raw:
            raw_times.append(raw_write(ctx, buf, i))
        settle(ctx.device)
        t0 = now()
        h = cr.save()
        blocking.append(now() - t0)
        h.wait("committed", timeout=600)
        committed.append(now() - t0)
    return {
        "blocking": blocking,
        "durable": committed,
        "limit": limit,
        "raw": raw_times,
        "first": first,
        "first_committed": first_committed,
    }


def verify_ckptd(state: State, url: str, tag: str) -> bool:
    """Load the checkpoint with ``ckptd.load`` and compare it bit for bit with the live state."""
    loaded = ckptd.load(url, tag=tag)
    snap = state.snapshot()
    ok_model = bitwise_equal(loaded["model"], snap["model"])
    ok_opt = bitwise_equal(
        _canon(loaded["optimizer"]), _canon(snap["optimizer"])
    ) or _tensors_equal(loaded["optimizer"], snap["optimizer"])
    del loaded
    return ok_model and ok_opt


def _canon(x: Any) -> Any:
    """Optimizer state as restored may key params by str; compare by value, not key type."""
    if isinstance(x, dict):
        return {str(k): _canon(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_canon(v) for v in x]
    return x


def _tensors_equal(a: Any, b: Any) -> bool:
    from .states import unique_tensors

    ta, tb = unique_tensors(a), unique_tensors(b)
    return len(ta) == len(tb) and all(bitwise_equal(x, y) for x, y in zip(ta, tb, strict=True))


# ---- the loop: extra wall time per save --------------------------------------------------


class Workload:
    """The loop's compute between saves: matmuls, sized to ``factor`` x the copy time."""

    def __init__(self, device: torch.device, target_s: float) -> None:
        m = 8192 if device.type == "cuda" else 768
        gen = torch.Generator(device=device).manual_seed(0)
        self.a = torch.randn(m, m, device=device, generator=gen)
        self.out = torch.empty_like(self.a)
        self.device = device
        times = []
        for _ in range(5):
            t0 = now()
            torch.mm(self.a, self.a, out=self.out)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(now() - t0)
        self.t_mm = statistics.median(times[1:])
        self.n = max(1, round(target_s / self.t_mm))

    def __call__(self) -> None:
        for _ in range(self.n):
            torch.mm(self.a, self.a, out=self.out)


def timed_loop(
    ctx: Ctx,
    work: Workload,
    steps: int,
    every: int,
    save: Callable[[int], Any] | None = None,
    pre_step: Callable[[], None] | None = None,
) -> float:
    """``steps`` iterations of work + optimizer.step + update; a save at step 1, 1+every, ...

    ``optimizer.step()`` has no gradients to apply, so it costs nothing, but it runs ckptd's step
    pre-hook (the fence: on CUDA the update below waits, on the GPU, for the staging copy)."""
    st = ctx.state
    settle(ctx.device)
    t0 = now()
    for i in range(steps):
        work()
        if pre_step is not None:
            pre_step()
        st.optimizer.step()
        st.touch()
        if save is not None and i % every == 0:
            save(i)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    return now() - t0


def run_loop(ctx: Ctx, cr: CkptdRun, copy_s: float, write_s: float, saves: int) -> dict[str, Any]:
    """Total loop time with a save every K steps minus without, per save, for each contender.

    The step (``2 x`` the copy time) is longer than the copy; K is chosen so the interval between
    saves is ~1.3 x the time to write the state to disk, so that a save does not queue behind the
    previous one (that would measure the disk, not the save path)."""
    work = Workload(ctx.device, 2 * copy_s)
    step_s = work.n * work.t_mm
    every = max(2, int(1.3 * write_s / max(step_s, 1e-6)) + 1)
    steps = every * saves
    torch_path = ctx.infra.path("loop", "torch")
    dcp = DcpSaver(ctx, "stager" if ctx.device.type == "cuda" else "default", torch_path + "-dcp")

    def ckptd_save(i: int) -> None:
        cr.save()

    def torch_save(i: int) -> None:
        torch.save(ctx.state.snapshot(), f"{torch_path}-{i % 2}.pt")

    def dcp_save(i: int) -> None:
        if dcp.pending is not None:
            dcp.done(dcp.pending)  # DCP: one save in flight; wait before starting the next
        dcp.pending = dcp.save()

    def dcp_pre_step() -> None:
        if dcp.pending is not None:
            dcp.staged(dcp.pending)  # the state may change only once it is staged

    out: dict[str, list[float]] = {"base": [], "ckptd": [], "torch.save": [], "dcp": []}
    try:
        for _ in range(ctx.repeats):
            out["base"].append(timed_loop(ctx, work, steps, every))
            out["ckptd"].append(timed_loop(ctx, work, steps, every, ckptd_save))
            cr.ckpt.flush("committed", timeout=600)
            out["torch.save"].append(timed_loop(ctx, work, steps, every, torch_save))
            out["dcp"].append(timed_loop(ctx, work, steps, every, dcp_save, dcp_pre_step))
            dcp.close()
            dcp = DcpSaver(ctx, dcp.kind, dcp.folder)
    finally:
        dcp.close()
        for i in range(2):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{torch_path}-{i}.pt")
    extra = {
        k: [(t - b) / saves for t, b in zip(v, out["base"], strict=True)]
        for k, v in out.items()
        if k != "base"
    }
    return {
        "extra": extra,
        "base": out["base"],
        "steps": steps,
        "every": every,
        "saves": saves,
        "step_s": step_s,
        "matmuls_per_step": work.n,
        "skipped": cr.ckpt.skipped,
    }


# ---- uploads -----------------------------------------------------------------------------


def committed_files(root: str, run: str, tag: str) -> tuple[str, dict[str, dict[str, Any]]]:
    d = os.path.join(root, run, "checkpoints", tag)
    with open(os.path.join(d, "MANIFEST.json")) as f:
        return d, json.load(f)["files"]


async def _put_files(url: str, directory: str, files: dict[str, dict[str, Any]]) -> None:
    """ckptd's store backend used directly, like the daemon does: 4 files at once."""
    from ckptd.storage import open_store

    sem = asyncio.Semaphore(4)
    async with open_store(url) as store:

        async def one(name: str, rec: dict[str, Any]) -> None:
            async with sem:
                await store.put_file(
                    name,
                    os.path.join(directory, name),
                    size=int(rec["size"]),
                    crc32c=int(rec["crc32c"], 16),
                )

        await asyncio.gather(*(one(n, r) for n, r in files.items()))


def run_upload(
    ctx: Ctx,
    cr: CkptdRun,
    store_url: str,
    other_name: str,
    other: Callable[[str, dict[str, Any], int], None],
    cleanup: Callable[[], None],
) -> dict[str, Any]:
    """Per repeat: a daemon save -> committed -> uploaded; ckptd's ``put_file`` on the same
    committed files; then ``other`` (boto3 / gcloud-aio) on the same files to the same server."""
    res: dict[str, list[float]] = {"ckptd daemon": [], "ckptd put_file": [], other_name: []}
    e2e: list[float] = []
    nbytes = 0
    for i in range(ctx.repeats):
        settle(ctx.device)
        t0 = now()
        h = cr.save()
        h.wait("committed", timeout=600)
        tc = now()
        h.wait("uploaded", timeout=1800)
        tu = now()
        directory, files = committed_files(cr.root, cr.run, h.tag)
        nbytes = sum(int(r["size"]) for r in files.values())
        res["ckptd daemon"].append(nbytes / (tu - tc))
        e2e.append(tu - t0)
        cleanup()
        t0 = now()
        asyncio.run(_put_files(f"{store_url}/direct-{i}", directory, files))
        res["ckptd put_file"].append(nbytes / (now() - t0))
        cleanup()
        t0 = now()
        other(directory, files, i)
        res[other_name].append(nbytes / (now() - t0))
        cleanup()
        shutil.rmtree(directory, ignore_errors=True)
    return {"throughput": res, "save_to_uploaded": e2e, "bytes": nbytes}


def boto3_uploader(endpoint: str, bucket: str) -> tuple[Callable[..., None], Callable[[], None]]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=bucket)

    def upload(directory: str, files: dict[str, Any], i: int) -> None:
        for name in files:  # default TransferConfig: 8 MiB parts, 10 threads
            client.upload_file(os.path.join(directory, name), bucket, f"boto3-{i}/{name}")

    def cleanup() -> None:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for page in pages:
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys})

    return upload, cleanup


def gcloud_uploader(host: str, bucket: str) -> tuple[Callable[..., None], Callable[[], None]]:
    """gcloud-aio-storage's own ``Storage.upload`` (a file object: streamed, one request each)."""
    import urllib.parse
    import urllib.request

    def upload(directory: str, files: dict[str, Any], i: int) -> None:
        from gcloud.aio.storage import Storage

        async def go() -> None:
            async with Storage() as storage:
                for name in files:
                    with open(os.path.join(directory, name), "rb") as f:
                        await storage.upload(bucket, f"gcloud-{i}/{name}", f, timeout=1800)

        asyncio.run(go())

    def cleanup() -> None:
        with urllib.request.urlopen(f"{host}/storage/v1/b/{bucket}/o", timeout=30) as r:
            items = json.load(r).get("items", [])
        for it in items:
            name = urllib.parse.quote(it["name"], safe="")
            req = urllib.request.Request(f"{host}/storage/v1/b/{bucket}/o/{name}", method="DELETE")
            with urllib.request.urlopen(req, timeout=30):
                pass

    return upload, cleanup


__all__ = [
    "CkptdRun",
    "Ctx",
    "ShmBuffer",
    "boto3_uploader",
    "gcloud_uploader",
    "has_dcp_stager",
    "limit_copy",
    "raw_write",
    "run_ckptd",
    "run_dcp",
    "run_limit",
    "run_loop",
    "run_torch_save",
    "run_torch_save_thread",
    "run_upload",
    "start_ckptd",
    "verify_ckptd",
]
