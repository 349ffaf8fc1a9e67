"""Port of pytorch/pytorch ``test/distributed/checkpoint/test_dtensor_resharding.py``.

A 4x4 DTensor saved with one placement (or mesh) and loaded into another, compared whole and
redistributed back. Adaptations: upstream runs on 4 GPUs (``skip_if_lt_x_gpu``, world 4, a
(2, 2) mesh); here on CPU with gloo and world 2, so its 2-D mesh is (2, 1). Each save gets a
fresh name (ckptd never overwrites a tag; upstream reuses one directory).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dist_cp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor, zeros

from .harness import WORLD_BACKENDS, Storage, check_world

ONE_D_PLACEMENTS = [[Shard(0)], [Replicate()]]
ONE_D_TO_ONE_D_PLACEMENTS = [([Replicate()], [Shard(0)]), ([Shard(0)], [Replicate()])]
TWO_D_PLACEMENTS = [
    [Replicate(), Replicate()],
    [Replicate(), Shard(0)],
    [Shard(0), Replicate()],
    [Shard(0), Shard(0)],
]
TWO_D_TO_TWO_D_PLACEMENTS = [(a, b) for a in TWO_D_PLACEMENTS for b in TWO_D_PLACEMENTS if a != b]


def _global() -> torch.Tensor:
    return torch.arange(16, dtype=torch.float).view(4, 4)


def _save(st: Storage, name: str, dtensor: Any) -> None:
    dist_cp.save_state_dict(state_dict={"dtensor": dtensor}, storage_writer=st.writer(name),
                            planner=dist_cp.DefaultSavePlanner())  # fmt: skip


def _load(st: Storage, name: str, target: Any) -> dict[str, Any]:
    state = {"dtensor": target}
    dist_cp.load_state_dict(state_dict=state, storage_reader=st.reader(name),
                            planner=dist_cp.DefaultLoadPlanner())  # fmt: skip
    return state


def _placement_change(ctx: Any, mesh_shape: tuple[int, ...], original: Any, new: Any) -> None:
    st: Storage = ctx.storage
    name = st.fresh("placement")
    mesh = init_device_mesh("cpu", mesh_shape)
    saved = distribute_tensor(_global(), mesh, placements=original)
    _save(st, name, saved)
    state = _load(st, name, zeros([4, 4], device_mesh=mesh, placements=new))
    whole = state["dtensor"].redistribute(mesh, placements=[Replicate()] * len(mesh_shape))
    assert torch.equal(_global(), whole.to_local())
    back = whole.redistribute(mesh, placements=original)
    assert torch.equal(saved.to_local(), back.to_local())


def one_d_to_one_d(ctx: Any, original: Any, new: Any) -> None:
    """TestDTensorReshardPlacementChange.test_1d_to_1d_reshard_placement_change."""
    _placement_change(ctx, (ctx.world,), original, new)


def two_d_to_two_d(ctx: Any, original: Any, new: Any) -> None:
    """TestDTensorReshardPlacementChange.test_2d_to_2d_reshard_placement_change."""
    _placement_change(ctx, (2, ctx.world // 2), original, new)


def one_d_to_two_d_mesh_change(ctx: Any) -> None:
    """TestDTensorReshardMeshChange.test_1d_to_2d_reshard_mesh_change."""
    st: Storage = ctx.storage
    for placements_1d in ONE_D_PLACEMENTS:
        name = st.fresh("mesh1d")
        mesh_1d = init_device_mesh("cpu", (ctx.world,))
        _save(st, name, distribute_tensor(_global(), mesh_1d, placements=placements_1d))
        for placements_2d in TWO_D_PLACEMENTS:
            mesh_2d = init_device_mesh("cpu", (2, ctx.world // 2))
            state = _load(st, name, zeros([4, 4], device_mesh=mesh_2d, placements=placements_2d))
            whole = state["dtensor"].redistribute(mesh_2d, placements=[Replicate(), Replicate()])
            assert torch.equal(_global(), whole.to_local())


def two_d_to_one_d_mesh_change(ctx: Any) -> None:
    """TestDTensorReshardMeshChange.test_2d_to_1d_reshard_mesh_change."""
    st: Storage = ctx.storage
    for placements_2d in TWO_D_PLACEMENTS:
        name = st.fresh("mesh2d")
        mesh_2d = init_device_mesh("cpu", (2, ctx.world // 2))
        _save(st, name, distribute_tensor(_global(), mesh_2d, placements=placements_2d))
        for placements_1d in ONE_D_PLACEMENTS:
            mesh_1d = init_device_mesh("cpu", (ctx.world,))
            state = _load(st, name, zeros([4, 4], device_mesh=mesh_1d, placements=placements_1d))
            whole = state["dtensor"].redistribute(mesh_1d, placements=[Replicate()])
            assert torch.equal(_global(), whole.to_local())


def _label(placements: Any) -> str:
    return "".join("S" if isinstance(p, Shard) else "R" for p in placements)


WORLD2 = [
    *(
        (f"test_1d_to_1d_reshard_placement_change[{_label(a)}-{_label(b)}]", one_d_to_one_d,
         {"original": a, "new": b})
        for a, b in ONE_D_TO_ONE_D_PLACEMENTS
    ),
    *(
        (f"test_2d_to_2d_reshard_placement_change[{_label(a)}-{_label(b)}]", two_d_to_two_d,
         {"original": a, "new": b})
        for a, b in TWO_D_TO_TWO_D_PLACEMENTS
    ),
    ("test_1d_to_2d_reshard_mesh_change", one_d_to_two_d_mesh_change, {}),
    ("test_2d_to_1d_reshard_mesh_change", two_d_to_one_d_mesh_change, {}),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", [name for name, _, _ in WORLD2])
@pytest.mark.parametrize("kind", WORLD_BACKENDS)
def test_world2(world2: Any, kind: str, case: str) -> None:
    check_world(world2(kind, case))
