"""Data-parallel jobs (DDP): one rank saves, and a restore reaches every rank.

Every DDP rank holds the same weights, so ``Checkpointer`` saves on one rank only (``save_rank``,
0 by default) and the other ranks' ``save()`` returns at once without any collective: no rank
waits for another. A restore either loads on ``save_rank`` and broadcasts the model and optimizer
state to the others (one read of the store), or loads on every rank by itself.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import RestoreError

__all__ = ["broadcast_restored", "rank_and_world"]


def rank_and_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device() -> torch.device:
    dist = torch.distributed
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _bcast(t: torch.Tensor, src: int, device: torch.device) -> None:
    if t.device == device and t.is_contiguous():
        torch.distributed.broadcast(t, src)
        return
    buf = t.detach().to(device).contiguous()
    torch.distributed.broadcast(buf, src)
    t.copy_(buf)


def _skeleton(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """The structure with each tensor replaced by its (index, shape, dtype, device)."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return ("__tensor__", len(tensors) - 1, list(obj.shape), str(obj.dtype), str(obj.device))
    if isinstance(obj, dict):
        return {k: _skeleton(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        out = [_skeleton(v, tensors) for v in obj]
        return out if isinstance(obj, list) else tuple(out)
    return obj


def _allocate(skel: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(skel, tuple) and len(skel) == 5 and skel[0] == "__tensor__":
        _, _, shape, dtype, device = skel
        t = torch.empty(shape, dtype=getattr(torch, dtype.removeprefix("torch.")), device=device)
        tensors.append(t)
        return t
    if isinstance(skel, dict):
        return {k: _allocate(v, tensors) for k, v in skel.items()}
    if isinstance(skel, list | tuple):
        out = [_allocate(v, tensors) for v in skel]
        return out if isinstance(skel, list) else tuple(out)
    return skel


def broadcast_restored(
    src: int,
    meta: dict[str, Any] | None,
    models: dict[str, Any],
    optimizers: dict[str, Any],
) -> dict[str, Any] | None:
    """After ``src`` restored into its objects, make every rank's objects equal to ``src``'s.

    Collective: every rank calls it with the same models and optimizers. Returns the meta on
    every rank (None everywhere when there was no checkpoint).
    """
    dist = torch.distributed
    box = [meta]
    dist.broadcast_object_list(box, src=src)
    meta = box[0]
    if meta is None:
        return None
    if "__ckptd_error__" in meta:
        if dist.get_rank() == src:
            return meta  # the caller raises its own error
        raise RestoreError(f"rank {src} could not restore: {meta['__ckptd_error__']}")
    device = _comm_device()
    rank = dist.get_rank()
    with torch.no_grad():
        for name in sorted(models):
            for t in models[name].state_dict().values():
                if isinstance(t, torch.Tensor):
                    _bcast(t, src, device)
        for name in sorted(optimizers):
            opt = optimizers[name]
            sent: list[torch.Tensor] = []
            skel = [_skeleton(opt.state_dict(), sent) if rank == src else None]
            dist.broadcast_object_list(skel, src=src)
            got: list[torch.Tensor] = []
            state = _allocate(skel[0], got) if rank != src else None
            for t in sent if rank == src else got:
                _bcast(t, src, device)
            if rank != src:
                opt.load_state_dict(state)
    return meta
