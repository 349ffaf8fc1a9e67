"""Blocking time per rank: ``dcp.async_save`` with ckptd's Writer vs plain DCP, in one run.

``python -m bench.dcp_ranks [--world 2] [--size 0.5] [--repeats 3] [--daemons 1]`` starts the
daemon(s) and ``--world`` ranks (gloo, CPU; on a GPU machine ``--device cuda`` keeps the state on
the GPU, one GPU per rank). Every rank holds its Shard(0) part of a GPT-2-like state (weights +
Adam moments, ``--size`` GB in all) as DTensors, and times, per save:

- **blocking**: from the call to ``dcp.async_save`` until the loop may touch its state again
  (DCP's default stager; DCP's ``DefaultStager`` with cached shared memory; ckptd's
  ``Writer``, whose ``stage()`` copies into the daemon's shared-memory slot).
- **done**: until the save's future resolves (plain DCP: files fsynced by DCP's writer on local
  disk; ckptd: every part committed by the daemon and the manifest written; with ``--daemons``
  above 1, every part also copied to a shared local store, as nodes would upload).
- **limit**: a ``torch._foreach_copy_`` of the same local tensors into a preallocated buffer.

Contenders alternate within each repeat; medians per rank. The last ckptd checkpoint is loaded
back with ``ckptd.dcp.Reader`` and compared bit for bit (the timed saves are real).
"""

from __future__ import annotations

import argparse
import datetime
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

now = time.perf_counter


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.dcp_ranks", description=__doc__.split("\n")[0]
    )
    p.add_argument("--world", type=int, default=2, help="ranks (default %(default)s)")
    p.add_argument("--size", type=float, default=0.5, help="state size in GB over all ranks")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--daemons", type=int, default=1, help="daemons (simulated nodes) to spread ranks over"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dir", default=None, help="work directory parent (default: system temp)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--sockets", default=None, help=argparse.SUPPRESS)
    p.add_argument("--store", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def sharded_state(args: argparse.Namespace, rank: int, mesh: Any) -> dict[str, Any]:
    import torch
    from torch.distributed.tensor import DTensor, Shard

    from .states import free, gpt_state

    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    st = gpt_state(args.size, args.dtype, "cpu", seed=0)
    seen: set[int] = set()
    out: dict[str, dict[str, Any]] = {"model": {}, "optim": {}}

    def put(group: str, name: str, t: torch.Tensor) -> None:
        if t.data_ptr() in seen:  # tied weights once
            return
        seen.add(t.data_ptr())
        if t.dim() >= 1 and t.shape[0] >= args.world:
            local = t.chunk(args.world)[rank].clone().to(device)
            out[group][name] = DTensor.from_local(
                local, mesh, [Shard(0)], run_check=False, shape=t.shape, stride=t.stride()
            )
        else:
            out[group][name] = t.clone().to(device)

    for name, t in st.model.state_dict().items():
        put("model", name, t)
    for pid, s in st.optimizer.state_dict()["state"].items():
        for k, v in s.items():
            put("optim", f"{pid}.{k}", v)
    free(st)
    return out


def local_tensors(state: dict[str, Any]) -> list[Any]:
    from torch.distributed.tensor import DTensor

    return [
        v.to_local() if isinstance(v, DTensor) else v
        for group in state.values()
        for v in group.values()
    ]


def rank_main(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.device_mesh import init_device_mesh

    import ckptd.dcp

    warnings.filterwarnings("ignore")
    rank = args.rank
    backend = "cpu:gloo,cuda:nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{args.work}/rdzv", rank=rank,
                            world_size=args.world, timeout=datetime.timedelta(minutes=10))  # fmt: skip
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    mesh = init_device_mesh(args.device, (args.world,))
    state = sharded_state(args, rank, mesh)
    tensors = local_tensors(state)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    sockets = args.sockets.split(",")
    writer = ckptd.dcp.Writer(run="bench", store=args.store,
                              socket=sockets[rank * len(sockets) // args.world])  # fmt: skip

    # The limit: the same local tensors into a preallocated, faulted-in shared mapping.
    mm = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    buf = torch.frombuffer(mm, dtype=torch.uint8)
    views, off = [], 0
    for t in tensors:
        n = t.numel() * t.element_size()
        views.append(buf[off : off + n].view(t.dtype).view(t.shape))
        off += n
    if args.device == "cuda":
        torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)

    def limit() -> float:
        t0 = now()
        torch._foreach_copy_(views, tensors)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return now() - t0

    cuda = args.device == "cuda"
    shm_stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=True,
                                              use_async_staging=False, use_non_blocking_copy=cuda))  # fmt: skip
    times: dict[str, dict[str, list[float]]] = {}

    def record(name: str, blocking: float, done: float) -> None:
        times.setdefault(name, {"blocking": [], "done": []})
        times[name]["blocking"].append(blocking)
        times[name]["done"].append(done)

    def plain(name: str, rep: int, stager: Any) -> None:
        path = os.path.join(args.work, f"{name}-{rep}")
        dist.barrier()
        os.sync()
        t0 = now()
        fut = dcp.async_save(state, checkpoint_id=path, async_stager=stager)
        if hasattr(fut, "staging_completion"):
            fut.staging_completion.result()
            fut = fut.upload_completion
        blocking = now() - t0
        fut.result()
        record(name, blocking, now() - t0)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)

    def ours(rep: int) -> None:
        dist.barrier()
        os.sync()
        t0 = now()
        fut = dcp.async_save(state, checkpoint_id=f"step-{rep}", storage_writer=writer)
        blocking = now() - t0
        fut.result()
        record("ckptd", blocking, now() - t0)

    ours(0)  # warm-up of each contender (arena, shared memory, code paths), not recorded
    plain("dcp-default", 0, None)
    plain("dcp-shm-stager", 0, shm_stager)
    times.clear()
    lim = []
    for rep in range(1, args.repeats + 1):
        order = [0, 1, 2] if rep % 2 else [2, 1, 0]
        for i in order:
            if i == 0:
                ours(rep)
            elif i == 1:
                plain("dcp-default", rep, None)
            else:
                plain("dcp-shm-stager", rep, shm_stager)
        lim.append(limit())
    times["limit"] = {"blocking": lim, "done": lim}

    # Honesty: the last ckptd save loads back bit for bit (into a zeroed copy of the state).
    target = {g: {k: torch.zeros_like(v) for k, v in d.items()} for g, d in state.items()}
    reader = ckptd.dcp.Reader(run="bench", store=args.store, socket=writer.socket)
    dcp.load(target, checkpoint_id=f"step-{args.repeats}", storage_reader=reader)
    equal = all(torch.equal(a, b) for a, b in zip(local_tensors(target), tensors, strict=True))
    writer.close()
    shm_stager.close()
    gathered: list[Any] = [None] * args.world
    dist.all_gather_object(
        gathered, {"rank": rank, "bytes": nbytes, "times": times, "equal": equal}
    )
    if rank == 0:
        with open(os.path.join(args.work, "result.json"), "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.rank is not None:
        rank_main(args)
        return 0
    from .infra import Infra

    with Infra(args.dir) as infra:
        # Several daemons stand for several nodes: they meet in a shared store (a local path).
        store = infra.path("shared-store", "") if args.daemons > 1 else None
        daemons = [infra.daemon(f"n{i}", store=store) for i in range(args.daemons)]
        work = tempfile.mkdtemp(prefix="dcp-", dir=infra.dir)
        base = [sys.executable, "-m", "bench.dcp_ranks", "--world", str(args.world),
                "--size", str(args.size), "--dtype", args.dtype, "--repeats", str(args.repeats),
                "--device", args.device, "--work", work,
                "--sockets", ",".join(d.socket for d in daemons),
                *(["--store", store] if store else [])]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.world))}
        procs = [subprocess.Popen([*base, "--rank", str(r)], env=env) for r in range(args.world)]
        try:
            codes = [p.wait() for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if any(codes):
            print(f"a rank failed: exit codes {codes}", file=sys.stderr)
            return 1
        with open(os.path.join(work, "result.json")) as f:
            ranks = json.load(f)
    report(args, ranks)
    return 0


def report(args: argparse.Namespace, ranks: list[dict[str, Any]]) -> None:
    med = statistics.median
    print(f"# dcp.async_save per rank: world {args.world}, {args.size:g} GB {args.dtype} in all, "
          f"{args.daemons} daemon(s), {args.device}, {args.repeats} repeats (median, ms)")  # fmt: skip
    names = ["limit", "ckptd", "dcp-default", "dcp-shm-stager"]
    print("| rank | MiB | " + " | ".join(f"{n} blocking" for n in names)
          + " | ckptd / dcp-default | ckptd / dcp-shm-stager | ckptd / limit | ckptd done | dcp-default done | restored bitwise |")  # fmt: skip
    print("|" + "---|" * (len(names) + 8))
    out = []
    for r in ranks:
        t = r["times"]
        b = {n: med(t[n]["blocking"]) for n in names}
        row = {
            "rank": r["rank"],
            "mib": r["bytes"] / 2**20,
            **{f"{n}_blocking_ms": b[n] * 1e3 for n in names},
            "ckptd_vs_dcp_default": b["ckptd"] / b["dcp-default"],
            "ckptd_vs_dcp_shm": b["ckptd"] / b["dcp-shm-stager"],
            "ckptd_vs_limit": b["ckptd"] / b["limit"],
            "ckptd_done_ms": med(t["ckptd"]["done"]) * 1e3,
            "dcp_default_done_ms": med(t["dcp-default"]["done"]) * 1e3,
            "equal": r["equal"],
        }
        out.append(row)
        print(f"| {row['rank']} | {row['mib']:.0f} | "
              + " | ".join(f"{b[n] * 1e3:.1f}" for n in names)
              + f" | {row['ckptd_vs_dcp_default']:.2f} | {row['ckptd_vs_dcp_shm']:.2f}"
              f" | {row['ckptd_vs_limit']:.2f} | {row['ckptd_done_ms']:.0f}"
              f" | {row['dcp_default_done_ms']:.0f} | {'yes' if row['equal'] else 'NO'} |")  # fmt: skip
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "ranks": out}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
