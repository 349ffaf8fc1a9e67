"""Unit tests: plain-data trees, the safetensors layout, names, the wire format, the facade."""

from __future__ import annotations

import io
import json
import random

import msgpack
import numpy as np
import pytest
import safetensors.torch
import torch

import ckptd
from ckptd.errors import ConfigError, ProtocolError, SerializationError
from ckptd.fmt import ALIGN, TORCH_DTYPES, PlanCache, _plain_optim_state, _plain_state, plan_save
from ckptd.names import check_name, make_tag
from ckptd.protocol import MAX_FRAME, FrameReader, encode, field
from ckptd.tree import flatten, unflatten
from tests.helpers import Net, bitwise_equal


def test_public_names_are_pinned() -> None:
    assert sorted(ckptd.__all__) == sorted(
        [
            "AccessDeniedError", "AlreadyExistsError", "Backpressure", "BucketMissingError", "Checkpointer",
            "CkptdError", "ConfigError", "CredentialsError", "DaemonUnavailableError", "StoreUnreachableError",
            "Experiment", "IntegrityError", "NotFoundError", "PermanentStorageError", "ProtocolError", "RestoreError",
            "SaveError", "SaveHandle", "SerializationError", "StorageError", "TransientStorageError",
            "__version__", "attach", "list_checkpoints", "load", "load_config", "verify",
        ]
    )  # fmt: skip
    for name in ckptd.__all__:
        assert hasattr(ckptd, name)


def test_tree_round_trip_keeps_types() -> None:
    rng = np.random.RandomState(3)
    obj = {
        "a": (1, 2.5, "x", None, True),
        "nested": {"list": [b"raw", {"t": torch.arange(4)}], 3: "int key"},
        "np_state": rng.get_state(),
        "torch_rng": torch.get_rng_state(),
        "big": 2**70,
        "scalar": np.float32(1.5),
    }
    skel, tensors = flatten(obj, "extra")
    packed = msgpack.unpackb(
        msgpack.packb(skel, use_bin_type=True), raw=False, strict_map_key=False
    )
    back = unflatten(packed, tensors)
    assert back["a"] == obj["a"] and isinstance(back["a"], tuple)
    assert back["nested"][3] == "int key"
    assert back["big"] == 2**70
    assert back["scalar"] == 1.5
    assert torch.equal(back["nested"]["list"][1]["t"], torch.arange(4))
    rng2 = np.random.RandomState()
    rng2.set_state(back["np_state"])  # a real consumer accepts it
    assert rng2.randint(1000) == np.random.RandomState(3).randint(1000)
    assert bitwise_equal(back["torch_rng"], obj["torch_rng"])


def test_tree_json_mode_survives_json() -> None:
    obj = {"b": b"\x00\x01", "inf": float("inf"), "t": (1, 2), 0: {"x": 1}}
    skel, _ = flatten(obj, "", json_safe=True)
    back = unflatten(json.loads(json.dumps(skel, allow_nan=False)), {})
    assert back == obj


@pytest.mark.parametrize(
    "bad", [lambda: 1, io.BytesIO(), object(), {"k": {1, 2}}, np.array([object()], dtype=object)]
)
def test_non_plain_data_is_refused_with_its_path(bad: object) -> None:
    with pytest.raises(SerializationError, match="extra"):
        flatten({"inner": [bad]}, "extra")


def _write(plan, tmp_path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Materialise a plan the way the daemon does: header + arena bytes."""
    arena = torch.zeros(plan.arena_size, dtype=torch.uint8)
    for f in plan.files:
        for ts, src in zip(f.tensors, f.srcs, strict=True):
            if ts.end > ts.begin:
                dst = arena[ts.arena_offset : ts.arena_offset + ts.end - ts.begin]
                dst.view(TORCH_DTYPES[ts.dtype]).view(ts.shape).copy_(src)
    paths = {}
    for f in plan.files:
        assert f.arena_offset % ALIGN == 0
        p = tmp_path / f.name
        p.write_bytes(
            f.header + arena[f.arena_offset : f.arena_offset + f.data_size].numpy().tobytes()
        )
        paths[f.name] = str(p)
    return paths


def test_weight_file_is_plain_safetensors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = Net()
    plan = plan_save({"model": model}, {}, None)
    paths = _write(plan, tmp_path)
    loaded = safetensors.torch.load_file(paths["model.weights.safetensors"])
    sd = model.state_dict()
    # The tied head is stored once; everything else under its own key, bit for bit.
    assert "head.weight" not in loaded and "embed.weight" in loaded
    for k, v in sd.items():
        if k != "head.weight":
            assert bitwise_equal(loaded[k], v.contiguous()), k
    with safetensors.safe_open(paths["model.weights.safetensors"], "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ckptd.aliases"]) == {"head.weight": "embed.weight"}


def test_optimizer_file_keeps_param_groups(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = Net()
    opt = torch.optim.AdamW(
        [{"params": list(model.body.parameters()), "lr": 1e-3}, {"params": [model.embed.weight]}],
        lr=1e-2,
        betas=(0.8, 0.9),
    )
    model(torch.randint(0, 64, (4, 3))).sum().backward()
    opt.step()
    plan = plan_save({}, {"model": opt}, None)
    paths = _write(plan, tmp_path)
    tensors = safetensors.torch.load_file(paths["model.optim.safetensors"])
    assert "state.0.exp_avg" in tensors
    with safetensors.safe_open(paths["model.optim.safetensors"], "pt") as f:
        skel = json.loads(f.metadata()["ckptd.optimizer"])
    back = unflatten(skel, tensors)
    assert bitwise_equal(back, opt.state_dict())
    assert back["param_groups"][0]["betas"] == (0.8, 0.9)


def test_plan_refuses_bad_state_before_copying() -> None:
    with pytest.raises(SerializationError):
        plan_save({"model": torch.nn.Linear(2, 2)}, {}, {"fn": lambda: 0})
    with pytest.raises(SerializationError):
        plan_save({"model": {"w": torch.zeros(2).to_sparse()}}, {}, None)
    with pytest.raises(SerializationError):
        plan_save({"model": 42}, {}, None)


def test_tensors_are_aligned_in_data_section() -> None:
    sd = {f"t{i}": torch.zeros(random.Random(i).randint(0, 9), dtype=dt)
          for i, dt in enumerate([torch.int8, torch.float64, torch.float16, torch.float32] * 3)}  # fmt: skip
    plan = plan_save({"model": sd}, {}, None)
    (f,) = plan.files
    header_len = len(f.header)
    assert header_len % 8 == 0
    for ts, src in zip(f.tensors, f.srcs, strict=True):
        assert ts.begin % src.element_size() == 0


def test_names_refuse_traversal() -> None:
    for bad in ["../x", "/abs", "a/../b", "x\0y", "", ".hidden", "a b", "t.partial", 3, "-x"]:
        with pytest.raises(ConfigError):
            check_name(bad, "tag")
    for bad in ["a//b", "a/./b", "../a"]:
        with pytest.raises(ConfigError):
            check_name(bad, "run")
    assert check_name("proj/name/2026-11-25_10-00-00", "run")
    with pytest.raises(ConfigError):
        check_name("optimizer", "model name")
    assert make_tag(12) == "step-00000012"
    assert make_tag(12, epoch=1, sample=384) == "E1_U12_S384"


def test_frame_reader_handles_partial_and_bad_frames() -> None:
    r = FrameReader()
    frame = encode({"op": "status", "rid": 1})
    r.feed(frame[:3])
    assert r.messages() == []
    r.feed(frame[3:] + frame)
    assert [m["op"] for m in r.messages()] == ["status", "status"]
    r = FrameReader()
    r.feed((MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="exceeds"):
        r.messages()
    r = FrameReader()
    r.feed(len(msgpack.packb([1, 2])).to_bytes(4, "big") + msgpack.packb([1, 2]))
    with pytest.raises(ProtocolError, match="not a map"):
        r.messages()
    r = FrameReader()
    r.feed(b"\x00\x00\x00\x02\xc1\xc1")
    with pytest.raises(ProtocolError):
        r.messages()
    with pytest.raises(ProtocolError):
        field({"op": "save", "id": "7"}, "id", int)
    with pytest.raises(ProtocolError):
        field({"op": "save", "id": True}, "id", int)


def test_fast_module_state_matches_state_dict() -> None:
    """The hook-free walk gives what ``state_dict(keep_vars=True)`` gives, or steps aside."""
    model = Net()
    model.register_buffer("scratch", torch.zeros(3), persistent=False)
    model.shared = model.body  # one submodule under two names: both prefixes, as state_dict
    fast = _plain_state(model)
    assert fast is not None
    want = model.state_dict(keep_vars=True)
    assert list(fast) == list(want) and all(fast[k] is want[k] for k in want)
    assert "scratch" not in fast

    class Extra(torch.nn.Linear):
        def get_extra_state(self) -> dict[str, int]:
            return {"calls": 1}

    model.body[0] = Extra(16, 32)
    assert _plain_state(model) is None
    model.body[0] = torch.nn.Linear(16, 32)
    model.body[2]._register_state_dict_hook(lambda *a: None)
    assert _plain_state(model) is None


def test_fast_optimizer_state_matches_state_dict() -> None:
    model = Net()
    opt = torch.optim.AdamW(
        [{"params": list(model.body.parameters()), "lr": 1e-3}, {"params": [model.embed.weight]}]
    )
    model(torch.randint(0, 64, (4, 3))).sum().backward()
    opt.step()
    cache = PlanCache()
    for _ in range(2):  # first numbering, then the cached one
        fast = _plain_optim_state(opt, cache)
        assert fast is not None
        want = opt.state_dict()
        assert bitwise_equal(fast, want)
        assert [list(g) for g in fast["param_groups"]] == [list(g) for g in want["param_groups"]]
        assert list(fast["state"]) == list(want["state"])
    opt.add_param_group({"params": [model.bn.weight, model.bn.bias], "lr": 0.5})
    model(torch.randint(0, 64, (4, 3))).sum().backward()
    opt.step()
    assert bitwise_equal(_plain_optim_state(opt, cache), opt.state_dict())
    opt.register_state_dict_post_hook(lambda o, sd: sd)
    assert _plain_optim_state(opt, cache) is None


def test_cached_plan_sees_a_dtype_change_of_the_same_parameters() -> None:
    """``model.half()`` keeps the Parameter objects: the cached layout must not be reused."""
    model = torch.nn.Linear(4, 4)
    cache = PlanCache()
    first = plan_save({"model": model}, {}, None, cache).files[0]
    assert {ts.dtype for ts in first.tensors} == {"F32"}
    model.half()
    (f,) = plan_save({"model": model}, {}, None, cache).files
    assert {ts.dtype for ts in f.tensors} == {"F16"}
    assert all(src.dtype == torch.float16 for src in f.srcs)
    assert f.data_size == first.data_size // 2


def test_copy_of_many_small_tensors_is_split_and_exact(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from ckptd import stager

    monkeypatch.setattr(stager.torch, "get_num_threads", lambda: 4)
    src = [torch.randn(7, requires_grad=True) for _ in range(3 * stager._PARALLEL_MIN + 5)]
    buf = torch.zeros(7 * len(src))
    dst = list(buf.view(len(src), 7).unbind())
    stager.copy_all(dst, src)
    assert torch.equal(buf.view(len(src), 7), torch.stack([s.detach() for s in src]))
    assert not buf.requires_grad and all(d.grad_fn is None for d in dst)
    with pytest.raises(RuntimeError):  # a failure in any chunk reaches the caller
        stager.copy_all(dst, [*src[:-1], torch.zeros(3, 3)])
