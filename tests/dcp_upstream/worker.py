"""One rank of a ported module's world: ``python -m tests.dcp_upstream.worker RANK WORLD ARGS``.

Runs the named cases of the module's ``WORLD2`` table in order, with a barrier around each, and
appends one verdict line per case to ``<out>/rank-<r>.jsonl`` as soon as it is known.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import os
import sys
import traceback
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist

from .harness import SEED, Storage

warnings.filterwarnings("ignore")


class Context:
    """What a world case gets: its storage, rank and world size."""

    def __init__(self, storage: Storage, rank: int, world: int) -> None:
        self.storage, self.rank, self.world = storage, rank, world


def main() -> None:
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    args: dict[str, Any] = json.loads(sys.argv[3])
    dist.init_process_group(
        "gloo", init_method=f"file://{args['rendezvous']}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    module = importlib.import_module(args["module"])
    table = {name: (fn, params) for name, fn, params in module.WORLD2}
    storage = Storage(args["kind"], args["base"], socket=args["socket"])
    ctx = Context(storage, rank, world)
    with open(os.path.join(args["out"], f"rank-{rank}.jsonl"), "a") as out:
        for name in args["cases"]:
            fn, params = table[name]
            verdict: dict[str, Any] = {"case": name}
            dist.barrier()
            torch.manual_seed(SEED)  # as upstream's TestCase.setUp: every rank alike
            try:
                fn(ctx, **params)
            except pytest.skip.Exception as e:
                verdict["skip"] = str(e)
            except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is one
                verdict["error"] = f"{type(e).__name__}: {e}"
                verdict["trace"] = traceback.format_exc()
            out.write(json.dumps(verdict) + "\n")
            out.flush()
    storage.close()
    with contextlib.suppress(Exception):  # a dead peer can make teardown fail
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
