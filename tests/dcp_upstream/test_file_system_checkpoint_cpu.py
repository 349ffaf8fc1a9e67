"""Port of pytorch/pytorch ``test/distributed/checkpoint/test_file_system_checkpoint_cpu.py``.

Same state dicts and assertions, storage swapped (see ``harness.Storage``). Adaptations:
- ``thread_count`` and ``_extensions`` (Rot13, ZStandard) are ``FileSystemWriter`` options: they
  go to the file system writer and are meaningless to ckptd, which writes safetensors through its
  daemon; the ckptd runs check the same round trip without them.
- upstream saves again into one directory (``FileSystemWriter`` overwrites); ckptd never
  overwrites a tag, so every save gets a fresh name.
- ``test_load_rowwise_to_colwise`` calls ``.cuda()`` upstream; here it runs on CPU.
- ``test_dtype_mismatch_casting`` is newer than torch 2.13 (``allow_unsafe_types``): skipped
  where the option is missing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import IO, Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed._shard import sharded_tensor
from torch.distributed._shard.sharded_tensor import ShardedTensor, state_dict_hook
from torch.distributed._shard.sharding_spec import (
    ChunkShardingSpec,
    EnumerableShardingSpec,
    ShardingSpec,
    ShardMetadata,
)
from torch.distributed.checkpoint import load, load_state_dict, save, save_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.stateful import Stateful
from torch.testing._internal.distributed.checkpoint_utils import (
    Rot13Example,
    get_test_extension_registry,
)

from .harness import WORLD_BACKENDS, Storage, check_world

THREAD_COUNTS = (1, 2)


def assert_state_dict_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Upstream's helper: same keys; equal tensors, local shards and Statefuls."""
    assert len(a) == len(b), "state_dict must be the same size"
    assert set(a) == set(b), "state_dict keys do not match"
    for key, x in a.items():
        y = b[key]
        if isinstance(x, ShardedTensor):
            for s1, s2 in zip(x.local_shards(), y.local_shards(), strict=False):
                assert torch.equal(s1.tensor, s2.tensor), f"Key {key}'s shard does not match"
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"Key {key}'s tensor does not match"
        elif isinstance(x, Stateful):
            assert x == y


class MyTestModule(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear_1 = torch.nn.Linear(5, 5)
        self.linear_2 = torch.nn.Linear(5, 1)
        self.emb = torch.nn.EmbeddingBag(5, 10)


class MyShardedModel2(torch.nn.Module):
    """As in torch's ``_test_st_common`` (which needs expecttest to import)."""

    def __init__(self, spec: ShardingSpec, init_rrefs: bool = False) -> None:
        super().__init__()
        self.sharded_tensor2 = sharded_tensor.rand(spec, 10, 20, init_rrefs=init_rrefs)
        self.random_tensor2 = torch.nn.Parameter(torch.rand(2, 2))


class MyShardedModel1(torch.nn.Module):
    def __init__(self, spec: ShardingSpec, init_rrefs: bool = False) -> None:
        super().__init__()
        self.sharded_tensor1 = sharded_tensor.rand(spec, 10, 20, init_rrefs=init_rrefs)
        self.random_tensor1 = torch.nn.Parameter(torch.rand(2, 2))
        self.submodule = MyShardedModel2(spec, init_rrefs)


class MyShardedModel3(torch.nn.Module):
    def __init__(self, spec: ShardingSpec) -> None:
        super().__init__()
        self.sharded_tensor: ShardedTensor = sharded_tensor.rand(spec, 10, 20, init_rrefs=False)


class BlobState:
    """A Stateful whose state is one bytes value."""

    def __init__(self, value: IO[bytes] | bytes) -> None:
        self.state = {"blob": value}

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = state_dict

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlobState) and self.state == other.state

    def __repr__(self) -> str:
        return f"BlobState({self.state['blob']!r})"


# ---- TestDistributedStateDictSaveLoad (no process group) -------------------------------------


@pytest.mark.parametrize("thread_count", THREAD_COUNTS)
def test_read_write_only_tensor(storage: Storage, thread_count: int) -> None:
    saved = MyTestModule().state_dict()
    writer = storage.writer("ck", thread_count=thread_count)
    save_state_dict(state_dict=saved, storage_writer=writer, no_dist=True)
    target = MyTestModule().state_dict()
    with pytest.raises(AssertionError):
        assert_state_dict_equal(target, saved)
    load_state_dict(state_dict=target, storage_reader=storage.reader("ck"), no_dist=True)
    assert_state_dict_equal(target, saved)


def test_dtype_mismatch_casting(storage: Storage) -> None:
    if "allow_unsafe_types" not in inspect.signature(DefaultLoadPlanner).parameters:
        pytest.skip("DefaultLoadPlanner(allow_unsafe_types=) is newer than this torch")
    storage.save({"w": torch.rand(4, 3, dtype=torch.float32)}, "fp32")
    default = {"w": torch.zeros(4, 3, dtype=torch.bfloat16)}
    storage.load(default, "fp32")  # narrowing casts silently by default
    assert default["w"].dtype == torch.bfloat16
    strict = DefaultLoadPlanner(allow_unsafe_types=False)  # type: ignore[call-arg]
    with pytest.raises(CheckpointException) as raised:
        storage.load({"w": torch.zeros(4, 3, dtype=torch.bfloat16)}, "fp32", planner=strict)
    assert "dtype mismatch" in str(raised.value)
    assert "Silent casting is not allowed" in str(raised.value)
    storage.save({"w": torch.rand(4, 3, dtype=torch.bfloat16)}, "bf16")
    wide = {"w": torch.zeros(4, 3, dtype=torch.float32)}
    storage.load(wide, "bf16", planner=strict)  # widening is fine even when strict
    assert wide["w"].dtype == torch.float32


# ---- TestDistributedStateDictSaveLoadRot13 / ...ZStandard ----------------------------------


def _blob_round_trip(storage: Storage, extensions: Callable[[], list[Any]], registry: Any) -> None:
    saved = MyTestModule().state_dict()
    saved["test_blob"] = BlobState(b"SomeBlobForTesting")
    options = {} if storage.is_ckptd else {"_extensions": extensions()}
    save(state_dict=saved, storage_writer=storage.writer("ck", **options))
    target = MyTestModule().state_dict()
    target["test_blob"] = BlobState(b"")
    with pytest.raises(AssertionError):
        assert_state_dict_equal(target, saved)
    reader_options = (
        {} if storage.is_ckptd or registry is None else {"_extension_registry": registry}
    )
    load(state_dict=target, storage_reader=storage.reader("ck", **reader_options))
    assert_state_dict_equal(target, saved)


@pytest.mark.parametrize("thread_count", THREAD_COUNTS)
def test_read_write_tensor_and_blob_rot13(storage: Storage, thread_count: int) -> None:
    """TestDistributedStateDictSaveLoadRot13.test_read_write_tensor_and_blob."""
    _blob_round_trip(storage, lambda: [Rot13Example()], get_test_extension_registry())


@pytest.mark.parametrize("thread_count", THREAD_COUNTS)
def test_read_write_only_tensor_zstandard(storage: Storage, thread_count: int) -> None:
    """TestDistributedStateDictSaveLoadZStandard.test_read_write_only_tensor."""
    if not storage.is_ckptd:
        pytest.importorskip("zstandard", reason="DCP's ZStandard extension needs zstandard")
    from torch.distributed.checkpoint._extension import ZStandard

    _blob_round_trip(storage, lambda: [ZStandard()], None)


# ---- world 2 (gloo): ShardedTensor saves, resharding on load, bytes --------------------------


def _spec2(dim: int = 0) -> ChunkShardingSpec:
    return ChunkShardingSpec(dim=dim, placements=["rank:0", "rank:1"])


def _gather(t: ShardedTensor) -> torch.Tensor | None:
    out = torch.zeros(t.shape, device="cpu") if dist.get_rank() == 0 else None
    t.gather(out=out)
    return out


def read_write_shard_tensor(ctx: Any, thread_count: int) -> None:
    """TestDistributedStateDictSaveLoadWithSharedTensor.test_read_write_shard_tensor."""
    st: Storage = ctx.storage
    name = st.fresh("shard")
    model = MyShardedModel1(_spec2(), init_rrefs=False)
    model._register_state_dict_hook(state_dict_hook)
    saved = model.state_dict()
    save_state_dict(state_dict=saved, storage_writer=st.writer(name, thread_count=thread_count))
    dist.barrier()
    fresh = MyShardedModel1(_spec2(), init_rrefs=False)
    fresh._register_state_dict_hook(state_dict_hook)
    target = fresh.state_dict()
    dist.barrier()
    with pytest.raises(AssertionError):
        assert_state_dict_equal(target, saved)
    load_state_dict(state_dict=target, storage_reader=st.reader(name))
    assert_state_dict_equal(target, saved)
    dist.barrier()


SHARD_PLANS: list[ShardingSpec] = [
    _spec2(),
    ChunkShardingSpec(dim=0, placements=["rank:0", "rank:1", "rank:1", "rank:0"]),
    EnumerableShardingSpec(
        shards=[
            ShardMetadata(shard_offsets=[0, 0], shard_sizes=[2, 20], placement="rank:0"),
            ShardMetadata(shard_offsets=[2, 0], shard_sizes=[1, 20], placement="rank:1"),
            ShardMetadata(shard_offsets=[3, 0], shard_sizes=[3, 20], placement="rank:0"),
            ShardMetadata(shard_offsets=[6, 0], shard_sizes=[3, 20], placement="rank:1"),
            ShardMetadata(shard_offsets=[9, 0], shard_sizes=[1, 20], placement="rank:0"),
        ]
    ),
    EnumerableShardingSpec(
        shards=[
            ShardMetadata(shard_offsets=[0, 0], shard_sizes=[8, 20], placement="rank:1"),
            ShardMetadata(shard_offsets=[8, 0], shard_sizes=[2, 20], placement="rank:0"),
        ]
    ),
]


def load_with_different_shard_plan(ctx: Any, thread_count: int) -> None:
    """TestDistributedReshardOnLoad.test_load_with_different_shard_plan."""
    st: Storage = ctx.storage
    assert dist.get_world_size() == 2
    for s0 in SHARD_PLANS:
        for s1 in SHARD_PLANS:
            if s0 == s1:
                continue
            name = st.fresh("plan")
            dist.barrier()
            saving = MyShardedModel3(s0)
            saving._register_state_dict_hook(state_dict_hook)
            save_state_dict(state_dict=saving.state_dict(),
                            storage_writer=st.writer(name, thread_count=thread_count))  # fmt: skip
            dist.barrier()
            loading = MyShardedModel3(s1)
            loading._register_state_dict_hook(state_dict_hook)
            target = loading.state_dict()
            dist.barrier()
            load_state_dict(state_dict=target, storage_reader=st.reader(name))
            dist.barrier()
            stored = _gather(saving.sharded_tensor)
            dist.barrier()
            loaded = _gather(loading.sharded_tensor)
            if dist.get_rank() == 0:
                assert torch.allclose(stored, loaded), f"{s0} vs {s1}"


def load_rowwise_to_colwise(ctx: Any, thread_count: int) -> None:
    """TestDistributedReshardOnLoad.test_load_rowwise_to_colwise (on CPU, not CUDA)."""
    st: Storage = ctx.storage
    name = st.fresh("rowcol")
    saving = MyShardedModel3(_spec2(0))
    saving._register_state_dict_hook(state_dict_hook)
    save_state_dict(state_dict=saving.state_dict(),
                    storage_writer=st.writer(name, thread_count=thread_count))  # fmt: skip
    loading = MyShardedModel3(_spec2(1))
    loading._register_state_dict_hook(state_dict_hook)
    load_state_dict(state_dict=loading.state_dict(), storage_reader=st.reader(name))
    stored = _gather(saving.sharded_tensor)
    loaded = _gather(loading.sharded_tensor)
    if dist.get_rank() == 0:
        assert torch.allclose(stored, loaded)


def save_load_bytes(ctx: Any, thread_count: int) -> None:
    """TestDistributedReshardOnLoad.test_save_load_bytes."""
    st: Storage = ctx.storage
    name = st.fresh("bytes")
    save_state_dict(state_dict={"bytes0": [1], "bytes1": "string"},
                    storage_writer=st.writer(name, thread_count=thread_count))  # fmt: skip
    target = {"bytes0": [2], "bytes1": "other"}
    load_state_dict(state_dict=target, storage_reader=st.reader(name))
    assert target["bytes0"] == [1]
    assert target["bytes1"] == "string"


def switch_between_sharded_tensor_to_tensor(ctx: Any, thread_count: int) -> None:
    """TestDistributedReshardOnLoad.test_switch_between_sharded_tensor_to_tensor."""
    st: Storage = ctx.storage
    size = 32
    specs: list[ShardingSpec] = [
        _spec2(),
        ChunkShardingSpec(dim=0, placements=["rank:0", "rank:1", "rank:1", "rank:0"]),
        EnumerableShardingSpec(shards=[
            ShardMetadata(shard_offsets=[0], shard_sizes=[8], placement="rank:1"),
            ShardMetadata(shard_offsets=[8], shard_sizes=[size - 8], placement="rank:0"),
        ]),
        EnumerableShardingSpec(shards=[
            ShardMetadata(shard_offsets=[0], shard_sizes=[10], placement="rank:0"),
            ShardMetadata(shard_offsets=[10], shard_sizes=[size - 10], placement="rank:1"),
        ]),
    ]  # fmt: skip
    for save_spec in specs:
        for load_spec in specs:
            name = st.fresh("switch")
            saved = {
                "sharded": sharded_tensor.rand(save_spec, size),
                "replicated": torch.rand(size, device="cpu"),
            }
            dist.broadcast(saved["replicated"], src=0)
            save_state_dict(state_dict=saved,
                            storage_writer=st.writer(name, thread_count=thread_count))  # fmt: skip
            target = {  # the two swapped
                "sharded": torch.zeros(size, device="cpu"),
                "replicated": sharded_tensor.zeros(load_spec, size),
            }
            load_state_dict(state_dict=target, storage_reader=st.reader(name))
            sharded = _gather(saved["sharded"])
            replicated = _gather(target["replicated"])
            if dist.get_rank() == 0:
                where = f"save-spec {save_spec} load-spec {load_spec}"
                assert torch.allclose(sharded, target["sharded"]), where
                assert torch.allclose(saved["replicated"], replicated), where


WORLD2 = [
    (f"{fn.__name__}[thread_count={tc}]", fn, {"thread_count": tc})
    for fn in (
        read_write_shard_tensor,
        load_with_different_shard_plan,
        load_rowwise_to_colwise,
        save_load_bytes,
        switch_between_sharded_tensor_to_tensor,
    )
    for tc in THREAD_COUNTS
]


@pytest.mark.slow
@pytest.mark.parametrize("case", [name for name, _, _ in WORLD2])
@pytest.mark.parametrize("kind", WORLD_BACKENDS)
def test_world2(world2: Any, kind: str, case: str) -> None:
    check_world(world2(kind, case))
