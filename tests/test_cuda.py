"""The CUDA path: pinned arena, device-to-host copies on a side stream, the optimizer step fence.

Skipped without a GPU (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import ckptd
from ckptd import Checkpointer
from ckptd.reader import _to_device
from tests.helpers import Net, bitwise_equal

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_state_round_trips_and_the_fence_orders_the_next_step(daemon) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = Net().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (8, 5), device="cuda")
    y = torch.randint(0, 64, (8,), device="cuda")

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    with Checkpointer("gpu", socket=daemon.socket) as ckpt:
        expect = copy.deepcopy({"m": model.state_dict(), "o": opt.state_dict()})
        h = ckpt.save(1, model=model, optimizer=opt)
        # The next steps run at once; the step pre-hook makes them wait for the copy on the GPU,
        # so what was staged is the state at save() time, not a later one.
        for _ in range(3):
            step()
        h.wait("committed", timeout=60)
        assert ckpt._arena.slots[0].pinned
    state = ckptd.load(os.path.join(daemon.root, "gpu"))
    assert bitwise_equal(state["model"], {k: v.cpu() for k, v in expect["m"].items()})
    assert bitwise_equal(state["optimizer"]["state"], _to_device(expect["o"]["state"], "cpu"))
    fresh = Net().cuda()
    with Checkpointer("gpu", socket=daemon.socket) as ckpt:
        ckpt.restore(fresh, map_location="cuda")
    assert all(p.is_cuda for p in fresh.parameters())
    assert bitwise_equal(
        {k: v.cpu() for k, v in fresh.state_dict().items()},
        {k: v.cpu() for k, v in expect["m"].items()},
    )


def test_load_onto_the_gpu_through_pinned_buffers_is_bitwise_equal(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``load(map_location="cuda")`` reads each file into pinned memory and copies it on a side
    stream while the next files are read: the result is on the GPU and equal to the CPU load."""
    from tests.test_read_into import checkpoint_files, put, same, trained

    net, opt = trained(11)
    url = str(tmp_path / "run")
    put(url, "s11", 11, checkpoint_files(net, opt, 11))
    on_cpu = ckptd.load(url)
    on_gpu = ckptd.load(url, map_location="cuda")
    assert all(t.is_cuda for t in on_gpu["model"].values())
    assert all(
        v.is_cuda for s in on_gpu["optimizer"]["state"].values() for v in s.values()
        if isinstance(v, torch.Tensor)
    )  # fmt: skip
    same(_to_device(on_gpu["model"], "cpu"), on_cpu["model"])
    same(_to_device(on_gpu["optimizer"], "cpu"), on_cpu["optimizer"])
    same(_to_device(on_gpu["extra"], "cpu"), on_cpu["extra"])


def test_a_frozen_base_on_the_gpu_is_stored_once_and_loads_back(daemon) -> None:  # type: ignore[no-untyped-def]
    """Incremental checkpoints on CUDA: the frozen part staged from the GPU, stored once,
    skipped with skip_unchanged, and loaded back onto the GPU with its weights file."""
    torch.manual_seed(0)
    model = Net().cuda()
    for p in (*model.body.parameters(), model.embed.weight):
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 64, (8, 5), device="cuda")
    y = torch.randint(0, 64, (8,), device="cuda")
    with Checkpointer("gpu-lora", socket=daemon.socket, skip_unchanged=True) as ckpt:
        for step in range(3):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ckpt.save(step, model=model, optimizer=opt).wait("committed", timeout=60)
        assert ckpt._plans.files["model.frozen.safetensors"].reuse is not None
    shared = os.listdir(os.path.join(daemon.root, "gpu-lora", "shared"))
    assert len(shared) == 1
    url = os.path.join(daemon.root, "gpu-lora")
    on_gpu = ckptd.load(url, map_location="cuda")
    assert bitwise_equal(_to_device(on_gpu["model"], "cpu"), _to_device(model.state_dict(), "cpu"))
    fresh = Net().cuda()
    with Checkpointer("gpu-lora", socket=daemon.socket) as ckpt:
        ckpt.restore(fresh, map_location="cuda")
    assert bitwise_equal(
        _to_device(fresh.state_dict(), "cpu"), _to_device(model.state_dict(), "cpu")
    )
