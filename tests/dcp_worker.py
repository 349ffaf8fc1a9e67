"""One rank of a multi-process DCP test: ``python -m tests.dcp_worker RANK WORLD ARGS_JSON``.

The parent starts WORLD of these (gloo over a file rendezvous) and reads each rank's verdict
from ``<out>/rank-<r>.json``. The state is a pure function of a seed, so a load in another world
size can check every full tensor bit for bit against what was saved.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import traceback
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import ckptd.dcp

warnings.filterwarnings("ignore")


def full_state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "embed": torch.randn(50, 12, generator=g),  # sharded (rows don't divide evenly)
            "w": torch.randn(64, 32, generator=g).to(torch.bfloat16),  # sharded, bf16
            "bias": torch.randn(32, generator=g),  # replicated: one rank writes it
            "count": torch.tensor(seed, dtype=torch.int64),  # replicated scalar
        },
        "optim": {"exp_avg": torch.randn(64, 32, generator=g), "lr": 0.001 * seed},
        "step": seed,
    }


SHARDED = [("model", "embed"), ("model", "w"), ("optim", "exp_avg")]  # same order on every rank


def sharded_state(seed: int, mesh: Any) -> dict[str, Any]:
    state = full_state(seed)
    for group, name in SHARDED:
        state[group][name] = distribute_tensor(state[group][name], mesh, [Shard(0)])
    return state


def check(loaded: dict[str, Any], seed: int) -> list[str]:
    want = full_state(seed)
    bad = []
    for group in ("model", "optim"):
        for name, expected in want[group].items():
            got = loaded[group][name]
            if isinstance(got, DTensor):
                got = got.full_tensor()
            if isinstance(expected, torch.Tensor):
                ok = got.dtype == expected.dtype and torch.equal(got, expected)
            else:
                ok = got == expected
            if not ok:
                bad.append(f"{group}.{name}")
    if loaded["step"] != want["step"]:
        bad.append("step")
    return bad


def fsdp_model(seed: int, mesh: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    return model, opt


def fsdp_full(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    out = {f"model.{k}": v for k, v in msd.items()}
    for pid, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"optim.{pid}.{k}"] = v
    return out


def ddp(rank: int, args: dict[str, Any], socket: str) -> dict[str, Any]:
    """DDP: rank 0 alone saves, without the others waiting; restores reach every rank."""
    import ckptd

    def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        model = torch.nn.parallel.DistributedDataParallel(net)
        return model, torch.optim.AdamW(model.parameters(), lr=0.01)

    model, opt = build(args["seed"])
    ckpt = ckptd.Checkpointer(args["run"], socket=socket)
    for _ in range(3):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    handle = ckpt.save(3, model=model.module, optimizer=opt, extra={"rank": rank})
    out: dict[str, Any] = {"state": handle.state, "connected": ckpt._conn is not None}
    handle.wait("committed")
    dist.barrier()
    want_m = {k: v.clone() for k, v in model.module.state_dict().items()}
    want_o = opt.state_dict()["state"][0]["exp_avg"].clone()
    bad = []
    for broadcast in (True, False):
        m2, o2 = build(args["seed"] + 100 + rank)  # every rank differs before the restore
        m2(torch.randn(4, 8)).sum().backward()
        o2.step()
        meta = ckpt.restore(model=m2.module, optimizer=o2, broadcast=broadcast)
        if meta is None or meta["extra"] != {"rank": 0}:
            bad.append(f"meta broadcast={broadcast}: {meta and meta.get('extra')}")
        for k, v in m2.module.state_dict().items():
            if not torch.equal(v, want_m[k]):
                bad.append(f"model.{k} broadcast={broadcast}")
        if not torch.equal(o2.state_dict()["state"][0]["exp_avg"], want_o):
            bad.append(f"optim broadcast={broadcast}")
    ckpt.close()
    # save_rank=None: every rank saves, each into its own run.
    own = ckptd.Checkpointer(f"{args['run']}-rank{rank}", socket=socket, save_rank=None)
    out["own_state"] = own.save(1, model=model.module).wait("committed").state
    own.close()
    out["bad"] = bad
    return out


def main() -> None:
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    args = json.loads(sys.argv[3])
    dist.init_process_group(
        "gloo", init_method=f"file://{args['rendezvous']}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    mesh = init_device_mesh("cpu", (world,))
    sockets = args["sockets"]
    socket = sockets[rank * len(sockets) // world]  # ranks spread over the daemons, node-like
    verdict: dict[str, Any] = {"rank": rank}
    try:
        action = args["action"]
        if action in ("save", "die"):
            # DTensors in every mode: process mode pickles the staged ones for DCP's process
            # (torch 2.13 segfaults on a plain staged DTensor; see ckptd/dcp/writer.py).
            plain = args.get("plain", False)
            state = full_state(args["seed"]) if plain else sharded_state(args["seed"], mesh)
            writer = ckptd.dcp.Writer(run=args["run"], store=args.get("store"), socket=socket)
            if action == "die" and rank == args["victim"]:
                real = writer._write

                def die(*a: Any, **kw: Any) -> Any:
                    real(*a, **kw)  # this rank's part reaches its daemon, then the rank dies
                    os._exit(9)

                writer._write = die  # type: ignore[method-assign]
            if args.get("mode") in ("async", "process"):
                from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

                kind = AsyncCheckpointerType(args["mode"].replace("async", "thread"))
                fut = dcp.async_save(state, checkpoint_id=args["tag"], storage_writer=writer,
                                     async_checkpointer_type=kind)  # fmt: skip
                for group, name in SHARDED:  # the loop goes on mutating its state
                    t = state[group][name]
                    (t if plain else t.to_local()).add_(1)
                fut.result()
            else:
                dcp.save(state, checkpoint_id=args["tag"], storage_writer=writer)
            writer.close()
            verdict["saved"] = True
        elif action == "load":
            state = sharded_state(args["seed"] + 1000, mesh)  # different values, same shapes
            state["step"] = -1
            reader = ckptd.dcp.Reader(run=args["run"], store=args.get("store"), socket=socket)
            dcp.load(state, checkpoint_id=args.get("tag"), storage_reader=reader)
            verdict["bad"] = check(state, args["seed"])
            verdict["tag"] = reader.tag
        elif action == "fsdp-save":
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model, opt = fsdp_model(args["seed"], mesh)
            model(torch.randn(4, 16)).sum().backward()
            opt.step()
            msd, osd = get_state_dict(model, opt)
            writer = ckptd.dcp.Writer(run=args["run"], store=args.get("store"), socket=socket)
            dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=args["tag"],
                           storage_writer=writer).result()  # fmt: skip
            writer.close()
            full = fsdp_full(model, opt)
            if rank == 0:
                torch.save(full, args["expect"])
            verdict["saved"] = True
        elif action == "fsdp-load":
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model, opt = fsdp_model(args["seed"] + 1, mesh)
            model(torch.randn(4, 16)).sum().backward()
            opt.step()
            msd, osd = get_state_dict(model, opt)
            state = {"model": msd, "optim": osd}
            reader = ckptd.dcp.Reader(run=args["run"], store=args.get("store"), socket=socket)
            dcp.load(state, checkpoint_id=args["tag"], storage_reader=reader)
            set_state_dict(
                model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"]
            )
            full = fsdp_full(model, opt)
            want = torch.load(args["expect"], weights_only=True)
            verdict["bad"] = sorted(
                k for k in want if k not in full or not torch.equal(full[k], want[k])
            )
        elif action == "ddp":
            verdict.update(ddp(rank, args, socket))
        else:
            raise ValueError(action)
    except BaseException as e:  # noqa: BLE001 - DCP raises CheckpointException, a BaseException
        verdict["error"] = f"{type(e).__name__}: {e}"
        verdict["trace"] = traceback.format_exc()
    with open(os.path.join(args["out"], f"rank-{rank}.json"), "w") as f:
        json.dump(verdict, f)
    with contextlib.suppress(Exception):  # a dead peer can make teardown fail
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
