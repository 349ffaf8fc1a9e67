"""Many DCP ranks in one process: ``python -m tests.scale_worker ARGS_JSON``.

Each rank is a thread on PyTorch's threaded process group (the one its own distributed tests
use), so 32 ranks cost one interpreter and one torch import instead of 32: on a 2-core machine
the daemons, the S3 server and the proxy get the CPU. Everything else is real: every rank has its
own ``ckptd.dcp.Writer`` and connection to its node's daemon (ranks spread over the sockets in
blocks, like 8 GPUs per node), DCP plans, dedups and gathers across the threads, and the
coordinating rank sends the global commit. Writes ``ARGS["out"]`` as JSON: per rank an error or
nothing, plus the wall time.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import traceback
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.testing._internal.distributed.multi_threaded_pg import (
    ProcessLocalGroup,
    _install_threaded_pg,
)

import ckptd.dcp

warnings.filterwarnings("ignore")


def rank_state(rank: int, small: int, big: torch.Tensor) -> dict[str, Any]:
    g = torch.Generator().manual_seed(rank)
    return {
        f"rank{rank:03d}": {"w": torch.randn(small // 4, generator=g)},  # this rank's own
        "big": big,  # the same on every rank: DCP's dedup gives it to one of them
        "step": 1,
    }


def main() -> None:
    args = json.loads(sys.argv[1])
    world, sockets = int(args["world"]), list(args["sockets"])
    big = torch.randn(int(args["big"]) // 4, generator=torch.Generator().manual_seed(99))
    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    _install_threaded_pg()
    store = dist.HashStore()
    errors: dict[int, str] = {}

    def rank_main(rank: int) -> None:
        dist.init_process_group("threaded", rank=rank, world_size=world, store=store)
        try:
            socket = sockets[rank * len(sockets) // world]
            writer = ckptd.dcp.Writer(run=args["run"], store=args["store"], socket=socket)
            state = rank_state(rank, int(args["small"]), big)
            dcp.save(state, checkpoint_id=args["tag"], storage_writer=writer)
            writer.close()
        except BaseException as e:  # noqa: BLE001 - DCP raises CheckpointException, a BaseException
            errors[rank] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            ProcessLocalGroup.exception_handle(e)  # wake the other ranks' collectives
        finally:
            dist.destroy_process_group()

    t0 = time.monotonic()
    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(args["out"], "w") as f:
        json.dump({"errors": errors, "seconds": time.monotonic() - t0}, f)


if __name__ == "__main__":
    main()
