"""Port of pytorch/pytorch ``test/distributed/checkpoint/e2e/test_e2e_save_and_load.py``.

Same models, state dicts and assertions, storage swapped. Adaptations:
- upstream gates the multi-rank cases on 4 GPUs; here they run on CPU, gloo, world 2 (so the
  HSDP mesh is (2, 1)). ``TestNoCPU`` needs NCCL and is not ported.
- FSDP1 refuses CPU ("FSDP needs a non-CPU accelerator device"): FSDP and HSDP models use
  ``fully_shard`` (FSDP2) instead, which shards state the same way (DTensors).
- ``torch.compile`` variants of ``test_e2e`` are left out: they test inductor, not storage, and
  compiling C++ kernels takes minutes on a 2-core CI.
- upstream polls the async future with ``time.sleep(1)``; here ``result(timeout)``.
- ``FileSystemWriter(cache_staged_state_dict=...)`` is a file system option; with ckptd the
  writer (its own stager, which always reuses its staging slots) is used where upstream uses the
  caching writer as stager. On a machine without an accelerator torch 2.13's caching stager and
  ``DefaultStager(use_shared_memory=True)`` fail ("Cannot access accelerator device"), so those
  variants are skipped where they need it (with ckptd the cached ones run: its stager does not).
- ``test_overwrite``: ckptd has no ``overwrite=True`` (a committed tag is never replaced), so
  with ckptd the case checks the refusal ("Checkpoint already exists" in DCP's
  ``CheckpointException``) and that the first checkpoint is intact.
- saving again under one directory (upstream) gets a fresh name (ckptd never overwrites).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from io import BytesIO
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as DCP
import torch.distributed.checkpoint.state_dict_saver as saver
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    _patch_model_state_dict,
    _patch_optimizer_state_dict,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.distributed_c10d import ReduceOp
from torch.testing._internal.distributed.common_state_dict import VerifyStateDictMixin

from ckptd.errors import AlreadyExistsError

from .harness import WORLD_BACKENDS, Storage, check_world

ASYNC_TIMEOUT_S = 120


def same(a: Any, b: Any) -> bool:
    """Deep equality of nested state (what torch's ``TestCase.assertEqual`` does for it)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        return a.shape == b.shape and bool(torch.allclose(a.float(), b.float()))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


class Verify(VerifyStateDictMixin):
    """Upstream's state dict checks, on plain asserts."""

    def assertEqual(self, a: Any, b: Any, msg: Any = None) -> None:
        assert same(a, b), msg or f"{a!r} != {b!r}"

    def assertTrue(self, x: Any, msg: Any = None) -> None:
        assert x, msg

    def assertFalse(self, x: Any, msg: Any = None) -> None:
        assert not x, msg

    def assertIsNotNone(self, x: Any, msg: Any = None) -> None:
        assert x is not None, msg


class TestDummyModel(nn.Module):
    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net1 = nn.Linear(8, 16)
        self.net2 = nn.Linear(16, 32)
        self.net3 = nn.Linear(32, 64)
        self.net4 = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.net1(x))
        x = F.relu(self.net2(x))
        x = F.relu(self.net3(x))
        return F.relu(self.net4(x))

    def get_input(self) -> torch.Tensor:
        return torch.rand(8, 8)


class TestStatefulObj:
    __test__ = False

    def __init__(self) -> None:
        self.data = torch.rand(10, 10)

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.data}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.data = state_dict["data"]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TestStatefulObj) and torch.equal(self.data, other.data)


class ModelType(enum.Enum):
    FSDP = enum.auto()
    HSDP = enum.auto()
    DDP = enum.auto()
    NONE = enum.auto()


@dataclasses.dataclass
class TestTrainState:
    """Its losses travel as a BytesIO: the value ckptd's restricted loader must accept."""

    __test__ = False
    step: int = 0
    current_loss: float = -1
    losses: list[float] = dataclasses.field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        loss_bytes = BytesIO()
        torch.save(self.losses, loss_bytes)
        return {
            "step": torch.tensor(self.step, dtype=torch.int32),
            "current_loss": torch.tensor(self.current_loss, dtype=torch.float32),
            "losses": loss_bytes,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = state_dict["step"].item()
        self.current_loss = state_dict["current_loss"].item()
        state_dict["losses"].seek(0)
        self.losses = torch.load(state_dict["losses"])

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, TestTrainState)
            and self.step == other.step
            and self.current_loss == other.current_loss
            and self.losses == other.losses
        )


def _train(model: Any, optim: Any, train_steps: int = 1) -> tuple[Any, TestTrainState]:
    torch.manual_seed(0)
    loss = None
    state = TestTrainState()
    for _ in range(train_steps):
        loss = model(model.get_input()).sum()
        loss.backward()
        state.step += 1
        state.current_loss = torch.rand(1).item()
        state.losses.append(state.current_loss)
        optim.step()
        optim.zero_grad()
    return loss, state


def _optim(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=0.1)


def _create_model(model_type: ModelType, world: int = 1) -> tuple[Any, Any]:
    """Upstream wraps in FSDP1 (``FullyShardedDataParallel``), which refuses to run without an
    accelerator; on CPU its successor ``fully_shard`` gives the same DTensor-sharded state
    (a 1-D mesh: FSDP; a (replicate, shard) mesh: HSDP)."""
    from torch.distributed.fsdp import fully_shard

    dummy = TestDummyModel()
    model: Any
    if model_type in (ModelType.FSDP, ModelType.HSDP):
        shape = (world,) if model_type == ModelType.FSDP else (2, world // 2)
        names = ("shard",) if model_type == ModelType.FSDP else ("replicate", "shard")
        model = fully_shard(dummy, mesh=init_device_mesh("cpu", shape, mesh_dim_names=names))
    elif model_type == ModelType.DDP:
        model = nn.parallel.DistributedDataParallel(dummy)
        model.get_input = functools.partial(TestDummyModel.get_input, model)
    else:
        model = dummy
    optim = _optim(model)
    if model_type is not ModelType.NONE:
        _patch_model_state_dict(model)
        _patch_optimizer_state_dict(model, optimizers=optim)
    return model, optim


# ---- world 2 (gloo): TestE2ESaveAndLoad, TestCheckpointOrderingAndOverwrite ------------------


def run_e2e(ctx: Any, model_type: ModelType, async_op: bool = False,
            cache_staged_state_dict: bool = False, async_checkpointer_type: Any = None,
            zoc: bool = False) -> None:  # fmt: skip
    """TestE2ESaveAndLoad._run_e2e_test (compile=False)."""
    shared = async_checkpointer_type == AsyncCheckpointerType.PROCESS
    if not torch.accelerator.is_available():
        if zoc:
            pytest.skip("zero-overhead staging (pinned memory, non-blocking copies) needs a GPU")
        if shared and not cache_staged_state_dict:  # fails the same with FileSystemWriter
            pytest.skip("DCP's DefaultStager(use_shared_memory=True) needs an accelerator")
        if cache_staged_state_dict and not ctx.storage.is_ckptd:  # ckptd's own stager runs
            pytest.skip("FileSystemWriter(cache_staged_state_dict=True) needs an accelerator")
    st: Storage = ctx.storage
    name = st.fresh("e2e")
    model, optim = _create_model(ModelType.NONE)
    _train(model, optim, train_steps=2)
    dist_model, dist_optim = _create_model(model_type, ctx.world)
    _, original_train_state = _train(dist_model, dist_optim, train_steps=2)
    original_stateful_obj = TestStatefulObj()
    sd = {"model": dist_model, "optimizer": dist_optim, "s": original_stateful_obj,
          "train_state": original_train_state}  # fmt: skip
    if async_op:
        options = {} if st.is_ckptd else {"cache_staged_state_dict": cache_staged_state_dict}
        writer = st.writer(name, **options)
        stager = None
        if not cache_staged_state_dict:
            stager = DefaultStager(StagingOptions(
                use_async_staging=zoc,
                use_shared_memory=shared,
                use_pinned_memory=zoc,
                use_non_blocking_copy=zoc,
            ))  # fmt: skip
        response = saver.async_save(
            sd, storage_writer=writer,
            async_checkpointer_type=async_checkpointer_type or AsyncCheckpointerType.THREAD,
            async_stager=stager,
        )  # fmt: skip
        if not isinstance(response, AsyncSaveResponse):
            future = response
        else:
            future = response.upload_completion
        future.result(timeout=ASYNC_TIMEOUT_S)
    else:
        st.save(sd, name)
    loaded_stateful_obj = TestStatefulObj()
    loaded_train_state = TestTrainState()
    dist_model, dist_optim = _create_model(model_type, ctx.world)
    st.load({"model": dist_model, "optimizer": dist_optim, "s": loaded_stateful_obj,
             "train_state": loaded_train_state}, name)  # fmt: skip
    assert original_stateful_obj == loaded_stateful_obj
    assert original_train_state == loaded_train_state
    loss, _ = _train(model, optim, train_steps=1)
    dist_loss, _ = _train(dist_model, dist_optim, train_steps=1)
    assert same(loss, dist_loss)
    dist_msd, dist_osd = get_state_dict(dist_model, optimizers=dist_optim)
    model_sd, _ = get_state_dict(model, optimizers=optim)
    v = Verify()
    v._verify_msd(model_sd, dist_msd)
    v._verify_osd_by_load(model, optim, _optim(model), dist_osd)


def partial_load(ctx: Any) -> None:
    """TestE2ESaveAndLoad.test_partial_load."""
    st: Storage = ctx.storage
    name = st.fresh("partial")
    model, optim = _create_model(ModelType.NONE)
    _train(model, optim, train_steps=2)
    dist_model, dist_optim = _create_model(ModelType.FSDP, ctx.world)
    _train(dist_model, dist_optim, train_steps=2)
    st.save({"model": dist_model, "optimizer": dist_optim}, name)
    dist_model, _ = _create_model(ModelType.FSDP, ctx.world)
    st.load({"model": dist_model}, name)
    v = Verify()
    v._verify_msd(get_model_state_dict(model), get_model_state_dict(dist_model))
    loaded = _load_state_dict_from_keys("model", storage_reader=st.reader(name))["model"]
    v._verify_msd(get_model_state_dict(model), loaded, offload_to_cpu=True)
    optim_state = _load_state_dict_from_keys("optimizer.state",
                                             storage_reader=st.reader(name))["optimizer"]["state"]  # fmt: skip
    assert "param_groups" not in optim_state
    for k, state in dist_optim.state_dict()["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            v._compare_tensor(optim_state[k][key], state[key], offload_to_cpu=True)


def different_ordered_state_dict_keys(ctx: Any) -> None:
    """TestCheckpointOrderingAndOverwrite.test_different_ordered_state_dict_keys: Statefuls
    that save nothing (an empty checkpoint) and run collectives on load must not deadlock."""
    st: Storage = ctx.storage
    world = ctx.world

    class Foo:
        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            tl = [torch.ones(2, dtype=torch.int64) for _ in range(world)]
            t = torch.arange(2, dtype=torch.int64) + 1 + 2 * dist.get_rank()
            dist.all_gather(tl, t, async_op=False)

    class Bar:
        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            t = torch.arange(2, dtype=torch.int64) + 1 + 2 * dist.get_rank()
            dist.all_reduce(t, op=ReduceOp.SUM)

    sd = {"A": Foo(), "B": Bar()} if ctx.rank == 0 else {"B": Bar(), "A": Foo()}
    name = st.fresh("ordered")
    st.save(sd, name)
    st.load(sd, name)


def overwrite(ctx: Any) -> None:
    """TestCheckpointOrderingAndOverwrite.test_overwrite (ckptd: the refusal half; see above)."""
    st: Storage = ctx.storage
    name = st.fresh("overwrite")
    t1, t2 = torch.randn(10), torch.randn(10)
    st.save({"random": t1}, name)
    if not st.is_ckptd:
        DCP.save({"random": t2}, storage_writer=DCP.FileSystemWriter(st.path(name), overwrite=True))
        sd = {"random": torch.zeros(10)}
        st.load(sd, name)
        assert torch.allclose(sd["random"], t2)
    with pytest.raises(CheckpointException, match=r".*Checkpoint already exists.*") as raised:
        if st.is_ckptd:
            st.save({"random": t2}, name)
        else:
            DCP.save({"random": t2},
                     storage_writer=DCP.FileSystemWriter(st.path(name), overwrite=False))  # fmt: skip
    # Caught the way DCP users catch FileSystemWriter's refusal (a RuntimeError inside).
    failures = [f[0] if isinstance(f, tuple) else f for f in raised.value.failures.values()]
    assert failures and all(isinstance(f, RuntimeError) for f in failures), failures
    if st.is_ckptd:
        assert all(isinstance(f, AlreadyExistsError) for f in failures), failures
        sd = {"random": torch.zeros(10)}
        st.load(sd, name)
        assert torch.allclose(sd["random"], t1)  # the committed checkpoint is untouched


ASYNC_CACHED = [
    (False, AsyncCheckpointerType.THREAD, False),
    (True, AsyncCheckpointerType.THREAD, False),
    (False, AsyncCheckpointerType.PROCESS, False),
    (True, AsyncCheckpointerType.PROCESS, False),
    (False, AsyncCheckpointerType.PROCESS, True),
    (False, AsyncCheckpointerType.THREAD, True),
]

WORLD2 = [
    *(
        (f"test_e2e[compile=False-{m.name}]", run_e2e, {"model_type": m})
        for m in (ModelType.FSDP, ModelType.HSDP, ModelType.DDP)
    ),
    *(
        (f"test_e2e_async_cached[cache={c}-{k.value}-zoc={z}]", run_e2e,
         {"model_type": ModelType.FSDP, "async_op": True, "cache_staged_state_dict": c,
          "async_checkpointer_type": k, "zoc": z})
        for c, k, z in ASYNC_CACHED
    ),
    ("test_partial_load", partial_load, {}),
    ("test_different_ordered_state_dict_keys", different_ordered_state_dict_keys, {}),
    ("test_overwrite", overwrite, {}),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", [name for name, _, _ in WORLD2])
@pytest.mark.parametrize("kind", WORLD_BACKENDS)
def test_world2(world2: Any, kind: str, case: str) -> None:
    check_world(world2(kind, case))


# ---- no process group: test_stateful_and_non_stateful_loads, test_no_dist, TestInitStateDict --


def test_stateful_and_non_stateful_loads(storage: Storage) -> None:
    class StateDict(dict):  # type: ignore[type-arg]
        def __init__(self) -> None:
            self.set_sd_item_called = False

        def __setitem__(self, item: Any, value: Any) -> None:
            self.set_sd_item_called = True
            super().__setitem__(item, value)

    class Foo(Stateful):
        def __init__(self) -> None:
            self.load_state_dict_called = False

        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self.load_state_dict_called = True

    stateful_foo = Foo()
    sd = StateDict()
    sd["foo"] = stateful_foo
    sd.set_sd_item_called = False
    storage.save(sd, "empty")  # nothing but metadata: it still commits
    storage.load(sd, "empty")
    assert stateful_foo.load_state_dict_called  # loaded in place
    assert not sd.set_sd_item_called  # and not replaced in the state dict

    sd = StateDict()
    sd["foo"] = {"replicated": torch.rand(10, 10), "bytes": [1, 2, 3, 4]}
    sd.set_sd_item_called = False
    storage.save(sd, "plain")
    storage.load(sd, "plain")
    assert sd.set_sd_item_called  # a plain dict item is replaced by the loaded one


def test_no_dist(storage: Storage) -> None:
    storage.save({}, "nothing")
    storage.load({}, "nothing")


def test_init_state_dict(storage: Storage) -> None:
    """TestInitStateDict.test_init_state_dict."""
    model = TestDummyModel()
    optim = torch.optim.Adam(model.parameters(), lr=0.1)
    storage.save({"model": get_model_state_dict(model),
                  "optimizer": get_optimizer_state_dict(model, optim)}, "init")  # fmt: skip
    torch.manual_seed(0)
    model_2 = TestDummyModel()
    optim_2 = torch.optim.Adam(model_2.parameters(), lr=0.2)  # lr is not a tensor
    msd = get_model_state_dict(model_2)
    osd = get_optimizer_state_dict(model_2, optim_2)
    state = {"model": msd, "optimizer": osd}
    storage.load(state, "init")
    assert msd is state["model"]  # DCP loads in place
    assert osd is state["optimizer"]
    set_state_dict(model_2, optim_2, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])  # fmt: skip
    assert same(msd, get_model_state_dict(model_2))
    assert same(osd, get_optimizer_state_dict(model_2, optim_2))
    assert optim_2.param_groups[0]["lr"] == 0.1
