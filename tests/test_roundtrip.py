"""Integration: a real daemon process, saves from real training, bitwise round trips."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import ckptd
from ckptd import Checkpointer
from tests.helpers import Net, bitwise_equal, train_steps


def _optimizers(model: torch.nn.Module) -> dict[str, torch.optim.Optimizer]:
    groups = [
        {"params": list(model.body.parameters()), "lr": 1e-3, "weight_decay": 0.1},
        {"params": [model.embed.weight, *model.bn.parameters()], "lr": 3e-3},
    ]
    return {
        "adam": torch.optim.Adam(copy.deepcopy(groups), lr=1e-3),
        "adamw": torch.optim.AdamW(copy.deepcopy(groups), lr=1e-3, betas=(0.85, 0.99)),
        "sgd": torch.optim.SGD(copy.deepcopy(groups), lr=1e-2, momentum=0.9, nesterov=True),
    }


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_model_and_optimizer_round_trip_bitwise(daemon, kind: str) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = Net()
    opt = _optimizers(model)[kind]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train_steps(model, opt, 3, seed=1, sched=sched)
    extra = {"scheduler": sched.state_dict(), "rng": torch.get_rng_state(), "np": np.arange(5)}
    expect = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "extra": extra})

    with Checkpointer("run1", socket=daemon.socket) as ckpt:
        handle = ckpt.save(3, model=model, optimizer=opt, extra=extra)
        handle.wait("uploaded", timeout=60)
        assert handle.done() and handle.state == "uploaded"
        assert handle.path and handle.path.endswith("checkpoints/step-00000003")

    state = ckptd.load(os.path.join(daemon.root, "run1"))
    assert bitwise_equal(state["model"], expect["model"])
    assert bitwise_equal(state["optimizer"], expect["opt"])
    assert bitwise_equal(state["extra"]["scheduler"], expect["extra"]["scheduler"])
    assert bitwise_equal(state["extra"]["rng"], expect["extra"]["rng"])
    assert np.array_equal(state["extra"]["np"], np.arange(5))
    assert state["meta"]["tag"] == "step-00000003" and state["meta"]["step"] == 3

    # Training resumes with identical results from fresh objects.
    torch.manual_seed(123)
    model2 = Net()
    opt2 = _optimizers(model2)[kind]
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    with Checkpointer("run1", socket=daemon.socket) as ckpt:
        meta = ckpt.restore(model2, opt2)
    assert meta is not None and meta["tag"] == "step-00000003"
    sched2.load_state_dict(meta["extra"]["scheduler"])
    assert model2.head.weight is model2.embed.weight
    assert bitwise_equal(model2.state_dict(), expect["model"])
    assert bitwise_equal(opt2.state_dict(), expect["opt"])
    assert train_steps(model, opt, 3, seed=9, sched=sched) == train_steps(
        model2, opt2, 3, seed=9, sched=sched2
    )


def test_store_layout_and_manifest(daemon) -> None:  # type: ignore[no-untyped-def]
    enc, dec, ema = Net(), Net(), Net()
    opt = torch.optim.SGD(enc.parameters(), lr=0.1, momentum=0.9)
    train_steps(enc, opt, 1, seed=0)
    with Checkpointer("proj/layout", socket=daemon.socket) as ckpt:
        ckpt.save(5, models={"encoder": enc, "decoder": dec, "ema": ema}, optimizers={"encoder": opt},
                  extra={"note": "hi"}, epoch=1, sample=640).wait()  # fmt: skip
        ckpt.save(6, model=enc, optimizer=opt, save_optim=False, tag="custom-tag").wait()
    run = os.path.join(daemon.root, "proj/layout")
    ck = os.path.join(run, "checkpoints", "E1_U5_S640")
    names = sorted(os.listdir(ck))
    assert names == sorted(["encoder.weights.safetensors", "decoder.weights.safetensors",
                            "ema.weights.safetensors", "encoder.optim.safetensors",
                            "extra.msgpack", "MANIFEST.json"])  # fmt: skip
    manifest = json.loads(Path(ck, "MANIFEST.json").read_text())
    for key in (
        "run_id",
        "tag",
        "training_iteration",
        "model_config",
        "files",
        "created",
        "torch_version",
    ):
        assert key in manifest, key
    assert manifest["training_iteration"] == {"epoch": 1, "update": 5, "sample": 640}
    assert manifest["model_config"]["encoder"]["class"].endswith("Net")
    for name, rec in manifest["files"].items():
        assert os.path.getsize(os.path.join(ck, name)) == rec["size"]
    # Readable by the safetensors library as is.
    w = safetensors.torch.load_file(os.path.join(ck, "encoder.weights.safetensors"))
    assert torch.equal(w["body.0.weight"], enc.body[0].weight)
    custom = os.listdir(os.path.join(run, "checkpoints", "custom-tag"))
    assert "model.optim.safetensors" not in custom and "model.weights.safetensors" in custom
    assert Path(run, "latest").read_text().strip() == "custom-tag"
    state = ckptd.load(run, tag="E1_U5_S640")
    assert set(state) >= {"encoder", "decoder", "ema", "optimizers", "extra", "meta"}
    assert state["extra"] == {"note": "hi"}
    assert bitwise_equal(state["optimizers"]["encoder"], opt.state_dict())
    assert [m["tag"] for m in ckptd.list_checkpoints(run)] == ["E1_U5_S640", "custom-tag"]


def test_many_saves_reuse_slots_and_latest_moves(daemon) -> None:  # type: ignore[no-untyped-def]
    model = Net()
    opt = torch.optim.Adam(model.parameters())
    with Checkpointer("loop", socket=daemon.socket, slots=2) as ckpt:
        handles = []
        for step in range(1, 9):
            train_steps(model, opt, 1, seed=step)
            handles.append(ckpt.save(step, model=model, optimizer=opt))
        expect = copy.deepcopy(model.state_dict())
        for h in handles:
            h.wait("uploaded", timeout=60)
        fds = {s.fd for s in ckpt._arena.slots}
        assert len(fds) == 2  # two slots, reused: no new buffer per save
    state = ckptd.load(os.path.join(daemon.root, "loop"))
    assert state["meta"]["step"] == 8
    assert bitwise_equal(state["model"], expect)


def test_attach_saves_every_n_steps_without_a_line_in_the_loop(daemon) -> None:  # type: ignore[no-untyped-def]
    model = Net()
    opt = torch.optim.AdamW(model.parameters())
    ckpt = ckptd.attach(model, opt, every=2, run="attached", socket=daemon.socket)
    train_steps(model, opt, 5, seed=0)
    ckpt.close()
    tags = [m["tag"] for m in ckptd.list_checkpoints(os.path.join(daemon.root, "attached"))]
    assert tags == ["step-00000002", "step-00000004"]


def test_skip_backpressure_counts_skipped_saves(daemon) -> None:  # type: ignore[no-untyped-def]
    model = Net()
    with Checkpointer("skippy", socket=daemon.socket, slots=1, backpressure="skip") as ckpt:
        held = ckpt._arena.acquire(block=False)  # the only slot is busy
        assert held is not None
        h = ckpt.save(1, model=model)
        assert h.skipped and h.state == "skipped" and ckpt.skipped == 1
        assert h.done()
        h.check()  # a skip is not a failure...
        with pytest.raises(ckptd.SaveError, match="skipped"):
            h.wait()  # ...but waiting for it to be committed would wait forever
        ckpt._arena.release(held.index)
        ckpt.save(2, model=model).wait()
    assert [m["step"] for m in ckptd.list_checkpoints(os.path.join(daemon.root, "skippy"))] == [2]


def test_bad_arguments_are_refused_early(daemon) -> None:  # type: ignore[no-untyped-def]
    with Checkpointer("args", socket=daemon.socket) as ckpt:
        with pytest.raises(ckptd.ConfigError):
            ckpt.save(-1, model=Net())
        with pytest.raises(ckptd.ConfigError):
            ckpt.save(1)
        with pytest.raises(ckptd.ConfigError):
            ckpt.save(1, model=Net(), tag="../escape")
        with pytest.raises(ckptd.SerializationError):
            ckpt.save(1, model=Net(), extra={"f": open(os.devnull)})  # noqa: SIM115
        # Nothing was staged: all slots are free and the daemon has no job for the run.
        assert all(s.free.is_set() for s in ckpt._arena.slots)
        assert not [j for j in ckpt.status()["jobs"] if j["run"] == "args"]
    with pytest.raises(ckptd.ConfigError):
        Checkpointer("x", socket=daemon.socket, backpressure="sometimes")


def test_plan_cache_follows_changes_between_saves(daemon) -> None:  # type: ignore[no-untyped-def]
    """Saves reuse layouts; values, learning rates, shapes and ties that change must still land."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    run = os.path.join(daemon.root, "cache")
    with Checkpointer("cache", socket=daemon.socket) as ckpt:
        for step in (1, 2, 3):  # same layout: cached; values and lr change
            train_steps(model, opt, 1, seed=step, sched=sched)
            ckpt.save(step, model=model, optimizer=opt).wait()
            state = ckptd.load(run)
            assert bitwise_equal(state["model"], model.state_dict())
            assert bitwise_equal(state["optimizer"], opt.state_dict())
        model.body[0] = torch.nn.Linear(16, 40)  # a new shape: the layout must be redone
        model.body[2] = torch.nn.Linear(40, 16)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        train_steps(model, opt, 1, seed=4)
        ckpt.save(4, model=model, optimizer=opt).wait()
        assert bitwise_equal(ckptd.load(run)["model"], model.state_dict())
        model.head.weight = torch.nn.Parameter(model.embed.weight.detach().clone() + 1)  # untie
        ckpt.save(5, model=model).wait()
        state = ckptd.load(run)
        assert bitwise_equal(state["model"], model.state_dict())
        assert not torch.equal(state["model"]["head.weight"], state["model"]["embed.weight"])
