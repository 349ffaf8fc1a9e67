"""DCP through ckptd: sharded saves over several ranks and daemons, the global commit, resharding.

Multi-process tests run real ranks (gloo on CPU, ``tests/dcp_worker.py``) against real daemons:
ranks are spread over one or two daemons (two simulated nodes with their own roots and sockets),
and the store is the daemon's root, a shared local path, or the moto S3 server.
"""

from __future__ import annotations

import fractions
import io
import json
import os
import subprocess
import sys
import warnings
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import ckptd
import ckptd.dcp
import ckptd.errors
from ckptd.errors import CkptdError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD_TIMEOUT_S = 150


def run_world(world: int, args: dict[str, Any], tmp_path: Any, name: str) -> list[dict[str, Any]]:
    """Start ``world`` ranks, wait for all, return each rank's verdict (None for a dead rank)."""
    out = tmp_path / f"out-{name}"
    out.mkdir()
    args = {**args, "out": str(out), "rendezvous": str(tmp_path / f"rdzv-{name}")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.dcp_worker", str(r), str(world), json.dumps(args)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(out / f"rank-{r}.log", "w"),  # noqa: SIM115 - closed with the process
        )
        for r in range(world)
    ]
    try:
        for p in procs:
            p.wait(timeout=WORLD_TIMEOUT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    verdicts = []
    for r in range(world):
        path = out / f"rank-{r}.json"
        verdicts.append(json.loads(path.read_text()) if path.exists() else None)
    return verdicts


def assert_ok(verdicts: list[dict[str, Any] | None], tmp_path: Any) -> None:
    for r, v in enumerate(verdicts):
        assert v is not None, f"rank {r} wrote no verdict"
        assert "error" not in v, f"rank {r}: {v['error']}\n{v.get('trace')}"
        assert not v.get("bad"), f"rank {r}: tensors differ after load: {v['bad']}"


def committed_tags(url: str) -> list[str]:
    return [m["tag"] for m in ckptd.list_checkpoints(url)]


# ---- single process (no process group): fast checks of the format and the edges ---------------


def _model_state(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(3, 8)).sum().backward()
    opt.step()
    return {"model": m.state_dict(), "optim": opt.state_dict(), "epoch": seed}


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*process group.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def test_single_process_save_load_and_layout(daemon) -> None:  # type: ignore[no-untyped-def]
    state = _model_state(1)
    writer = ckptd.dcp.Writer(run="solo", socket=daemon.socket)
    dcp.save(state, checkpoint_id="step-5", storage_writer=writer)
    ck = os.path.join(daemon.root, "solo", "checkpoints", "step-5")
    assert sorted(os.listdir(ck)) == [
        "MANIFEST.json", "dcp-metadata.json", "shard-00000-of-00001.safetensors",
    ]  # fmt: skip
    with open(os.path.join(ck, "MANIFEST.json")) as f:
        manifest = json.load(f)
    assert manifest["kind"] == "dcp" and manifest["step"] == 5 and manifest["world_size"] == 1
    # The shard is a plain safetensors file, and the metadata plain JSON.
    from safetensors.torch import load_file

    shard = load_file(os.path.join(ck, "shard-00000-of-00001.safetensors"))
    assert torch.equal(shard["model.0.weight"], state["model"]["0.weight"])
    with open(os.path.join(ck, "dcp-metadata.json")) as f:
        assert "state_dict_metadata" in json.load(f)
    ckptd.verify(os.path.join(daemon.root, "solo"), "step-5")
    assert not os.listdir(os.path.join(daemon.root, ".ckptd", "parts", "solo")), "parts left"
    status = subprocess.run(
        [sys.executable, "-m", "ckptd", "status", "--socket", daemon.socket],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "solo@step-5 part shard-00000-of-00001.safetensors" in status.stdout

    target = _model_state(2)
    dcp.load(target, checkpoint_id="step-5", storage_reader=ckptd.dcp.Reader(run="solo",
             socket=daemon.socket))  # fmt: skip
    for k, v in state["model"].items():
        assert torch.equal(target["model"][k], v)
    assert torch.equal(
        target["optim"]["state"][0]["exp_avg"], state["optim"]["state"][0]["exp_avg"]
    )
    assert target["epoch"] == 1
    writer.close()


def test_async_save_gathers_from_the_staged_copy_and_isolates_the_loop(daemon) -> None:  # type: ignore[no-untyped-def]
    state = _model_state(3)
    expected = {k: v.clone() for k, v in state["model"].items()}
    writer = ckptd.dcp.Writer(run="solo", socket=daemon.socket)
    placed: list[Any] = []
    real = writer._place
    writer._place = lambda tensors, size: placed.append(real(tensors, size)) or placed[-1]  # type: ignore[method-assign]
    fut = dcp.async_save(state, checkpoint_id="a-1", storage_writer=writer)
    for v in state["model"].values():  # the loop mutates its weights right after staging
        v.add_(1)
    fut.result()
    _, segments = placed[0]
    assert segments and segments[0][0] == 0, "the part should be written from the staged slot"
    target = _model_state(4)
    dcp.load(target, checkpoint_id="a-1",
             storage_reader=ckptd.dcp.Reader(url=os.path.join(daemon.root, "solo")))  # fmt: skip
    for k, v in expected.items():
        assert torch.equal(target["model"][k], v), k
    # A second async save reuses the layout and the slots.
    dcp.async_save(state, checkpoint_id="a-2", storage_writer=writer).result()
    assert committed_tags(os.path.join(daemon.root, "solo")) == ["a-1", "a-2"]
    writer.close()


def test_back_to_back_async_saves_keep_their_own_contents(daemon) -> None:  # type: ignore[no-untyped-def]
    """A second async_save before the first finished waits for it instead of reusing its slot."""
    writer = ckptd.dcp.Writer(run="solo", socket=daemon.socket)
    state = _model_state(5)
    first = {k: v.clone() for k, v in state["model"].items()}
    futures = [dcp.async_save(state, checkpoint_id="b-1", storage_writer=writer)]
    for v in state["model"].values():
        v.mul_(2)
    futures.append(dcp.async_save(state, checkpoint_id="b-2", storage_writer=writer))
    for f in futures:
        f.result()
    for tag, want in (("b-1", first), ("b-2", state["model"])):
        target = _model_state(6)
        dcp.load(target, checkpoint_id=tag,
                 storage_reader=ckptd.dcp.Reader(run="solo", socket=daemon.socket))  # fmt: skip
        for k, v in want.items():
            assert torch.equal(target["model"][k], v), (tag, k)
    writer.close()


def test_latest_and_refusals(daemon) -> None:  # type: ignore[no-untyped-def]
    writer = ckptd.dcp.Writer(run="solo", socket=daemon.socket)
    dcp.save(_model_state(1), checkpoint_id="step-1", storage_writer=writer)
    dcp.save(_model_state(2), checkpoint_id="step-2", storage_writer=writer)
    target = _model_state(9)
    reader = ckptd.dcp.Reader(run="solo", socket=daemon.socket)
    dcp.load(target, storage_reader=reader)  # no checkpoint_id: the newest sharded one
    assert reader.tag == "step-2" and target["epoch"] == 2
    # A committed tag is never overwritten.
    with pytest.raises(CheckpointException) as raised:
        dcp.save(_model_state(3), checkpoint_id="step-2", storage_writer=writer)
    assert "already exists" in str(raised.value.failures[0])
    assert target["epoch"] == 2
    # Objects that would need full unpickling are refused unless allowed.
    state = _model_state(1)
    state["obj"] = fractions.Fraction(1, 3)  # torch.load(weights_only=True) refuses it
    dcp.save(state, checkpoint_id="step-3", storage_writer=writer)
    target = {**_model_state(5), "obj": None}
    with pytest.raises(CheckpointException) as raised:
        dcp.load(target, checkpoint_id="step-3", storage_reader=ckptd.dcp.Reader(run="solo",
                 socket=daemon.socket))  # fmt: skip
    assert "allow_pickle" in str(raised.value.failures[0])
    dcp.load(target, checkpoint_id="step-3", storage_reader=ckptd.dcp.Reader(
        run="solo", socket=daemon.socket, allow_pickle=True))  # fmt: skip
    assert target["obj"] == fractions.Fraction(1, 3)
    # A Checkpointer checkpoint is not a DCP one, and ckptd.load says what a DCP one is.
    with pytest.raises(CkptdError, match="dcp"):
        ckptd.load(os.path.join(daemon.root, "solo"), "step-1")
    writer.close()


def test_corrupt_shard_is_refused(daemon) -> None:  # type: ignore[no-untyped-def]
    writer = ckptd.dcp.Writer(run="solo", socket=daemon.socket)
    dcp.save(_model_state(1), checkpoint_id="step-1", storage_writer=writer)
    writer.close()
    shard = os.path.join(daemon.root, "solo", "checkpoints", "step-1",
                         "shard-00000-of-00001.safetensors")  # fmt: skip
    with open(shard, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"\xff\xff\xff")
    with pytest.raises(CheckpointException) as raised:
        dcp.load(_model_state(2), checkpoint_id="step-1",
                 storage_reader=ckptd.dcp.Reader(run="solo", socket=daemon.socket))  # fmt: skip
    assert "does not match the manifest" in str(raised.value.failures[0])


# ---- many ranks, one or two daemons ----------------------------------------------------------


@pytest.mark.slow
def test_world4_over_two_daemons_to_a_shared_store_reshards_to_world2(
    make_daemon, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    store = str(tmp_path / "shared-store")
    a = make_daemon(store=store, name="a")
    b = make_daemon(store=store, name="b")
    base = {"run": "big", "store": store, "sockets": [a.socket, b.socket], "seed": 7}
    assert_ok(run_world(4, {**base, "action": "save", "tag": "step-7", "mode": "async"},
                        tmp_path, "save"), tmp_path)  # fmt: skip
    ck = os.path.join(store, "big", "checkpoints", "step-7")
    assert {"MANIFEST.json", "dcp-metadata.json"} <= set(os.listdir(ck))
    with open(os.path.join(ck, "MANIFEST.json")) as f:
        files = json.load(f)["files"]
    shards = {n: r for n, r in files.items() if n.startswith("shard-")}
    assert len(shards) == 4  # parts from both daemons' ranks, each a shared blob of the run
    blobs = set(os.listdir(os.path.join(store, "big", "shared")))
    assert all(f"{r['blob']}.safetensors" in blobs for r in shards.values())
    ckptd.verify(os.path.join(store, "big"), "step-7")
    # Load with world 2 (resharding), from the store, through a daemon-less reader URL too.
    assert_ok(run_world(2, {**base, "action": "load", "tag": "step-7"}, tmp_path, "load"), tmp_path)
    for d in (a, b):  # nothing is left behind in either daemon's staging area
        parts = os.path.join(d.root, ".ckptd", "parts")
        assert not os.path.isdir(parts) or not any(files for _, _, files in os.walk(parts))
        assert d.stop() == 0


@pytest.mark.slow
def test_killed_rank_leaves_nothing_visible_then_resave_over_s3(
    s3_bucket, make_daemon, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    store = f"s3://{s3_bucket}/ckpts"
    a = make_daemon(store=store, name="a")
    b = make_daemon(store=store, name="b")
    base = {"run": "big", "store": store, "sockets": [a.socket, b.socket], "seed": 11}
    verdicts = run_world(4, {**base, "action": "die", "victim": 3, "tag": "step-11"},
                         tmp_path, "die")  # fmt: skip
    assert verdicts[3] is None, "the victim should have died"
    assert all(v is not None and "error" in v for v in verdicts[:3]), verdicts
    url = f"{store}/big"
    assert "step-11" not in committed_tags(url)
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])

    def objects(prefix: str = "ckpts/big/checkpoints/step-11/") -> set[str]:
        listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix=prefix)
        return {o["Key"].rsplit("/", 1)[-1] for o in listed.get("Contents", [])}

    assert objects("ckpts/big/shared/")  # the ranks' parts are up (shared blobs) ...
    assert "MANIFEST.json" not in objects()  # ... but no manifest lists them
    with pytest.raises(CkptdError):
        ckptd.verify(url, "step-11")
    # Save the same tag again with the job restarted (world 2 now), then load it with world 4.
    assert_ok(run_world(2, {**base, "action": "save", "tag": "step-11", "mode": "sync"},
                        tmp_path, "resave"), tmp_path)  # fmt: skip
    assert committed_tags(url) == ["step-11"]
    manifest = ckptd.list_checkpoints(url)[0]
    assert manifest["world_size"] == 2
    ckptd.verify(url, "step-11")
    # Under the tag: only what is not shared; every shard the manifest lists is in shared/ (the
    # dead attempt's world-4 shards stay there, unlisted, until gc: see --blob-grace).
    blobs = {n: r for n, r in manifest["files"].items() if "blob" in r}
    assert objects() == {*manifest["files"], "MANIFEST.json"} - set(blobs)
    assert {f"{r['blob']}.safetensors" for r in blobs.values()} <= objects("ckpts/big/shared/")
    assert_ok(run_world(4, {**base, "action": "load"}, tmp_path, "load4"), tmp_path)
    assert a.stop() == 0 and b.stop() == 0


@pytest.mark.slow
def test_two_daemons_to_gcs_then_load_with_world1(gcs_bucket, make_daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = f"gs://{gcs_bucket}/ckpts"
    a = make_daemon(store=store, name="a")
    b = make_daemon(store=store, name="b")
    base = {"run": "big", "store": store, "sockets": [a.socket, b.socket], "seed": 9}
    assert_ok(run_world(2, {**base, "action": "save", "tag": "step-9", "mode": "async"},
                        tmp_path, "save"), tmp_path)  # fmt: skip
    url = f"{store}/big"
    assert committed_tags(url) == ["step-9"]
    ckptd.verify(url, "step-9")
    assert_ok(run_world(1, {**base, "action": "load"}, tmp_path, "load"), tmp_path)
    assert a.stop() == 0 and b.stop() == 0


@pytest.mark.slow
def test_process_mode_async_save(daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """DCP's process-mode async_save runs the writer in its own process (and process group)."""
    base = {"run": "proc", "sockets": [daemon.socket], "seed": 4, "tag": "step-4"}
    assert_ok(run_world(2, {**base, "action": "save", "mode": "process"}, tmp_path, "save"),
              tmp_path)  # fmt: skip
    assert committed_tags(os.path.join(daemon.root, "proc")) == ["step-4"]
    assert_ok(run_world(1, {**base, "action": "load"}, tmp_path, "load"), tmp_path)


@pytest.mark.slow
def test_fsdp2_save_and_load_with_another_world_size(daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = {"run": "fsdp", "sockets": [daemon.socket], "seed": 3, "tag": "step-3",
            "expect": str(tmp_path / "expect.pt")}  # fmt: skip
    assert_ok(run_world(2, {**base, "action": "fsdp-save"}, tmp_path, "save"), tmp_path)
    assert committed_tags(os.path.join(daemon.root, "fsdp")) == ["step-3"]
    assert_ok(run_world(1, {**base, "action": "fsdp-load"}, tmp_path, "load"), tmp_path)


@pytest.mark.slow
def test_ranks_on_two_daemons_without_a_store_fail_clearly(make_daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    a = make_daemon(name="a")
    b = make_daemon(name="b")
    base = {"run": "big", "sockets": [a.socket, b.socket], "seed": 5}
    verdicts = run_world(2, {**base, "action": "save", "tag": "step-5", "mode": "sync"},
                         tmp_path, "save")  # fmt: skip
    assert "shared store" in str(verdicts[0]), verdicts[0]
    for d in (a, b):
        assert not committed_tags(os.path.join(d.root, "big"))


@pytest.mark.slow
def test_ddp_saves_once_and_restores_on_every_rank(daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = {"run": "ddp", "sockets": [daemon.socket], "seed": 1, "action": "ddp"}
    verdicts = run_world(2, base, tmp_path, "ddp")
    assert_ok(verdicts, tmp_path)
    assert verdicts[1]["state"] == "other-rank" and not verdicts[1]["connected"]
    assert verdicts[0]["state"] != "other-rank" and verdicts[0]["connected"]
    assert committed_tags(os.path.join(daemon.root, "ddp")) == ["step-00000003"]
    for rank in (0, 1):
        assert verdicts[rank]["own_state"] in ("committed", "uploaded")
        assert committed_tags(os.path.join(daemon.root, f"ddp-rank{rank}")) == ["step-00000001"]


# ---- DCP parity (issue 18): empty checkpoints, DCP's own value types, existing tags ------------


def test_an_empty_state_dict_commits_its_metadata_only(daemon) -> None:  # type: ignore[no-untyped-def]
    class Nothing:  # a Stateful with nothing to save
        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self.loaded = state_dict

    writer = ckptd.dcp.Writer(run="solo", socket=daemon.socket)
    dcp.save({}, checkpoint_id="empty-1", storage_writer=writer)
    dcp.save({"n": Nothing()}, checkpoint_id="empty-2", storage_writer=writer)
    writer.close()
    url = os.path.join(daemon.root, "solo")
    assert committed_tags(url) == ["empty-1", "empty-2"]
    for tag in ("empty-1", "empty-2"):
        manifest = next(m for m in ckptd.list_checkpoints(url) if m["tag"] == tag)
        assert list(manifest["files"]) == ["dcp-metadata.json"]
        ckptd.verify(url, tag)
    target = Nothing()
    dcp.load({"n": target}, checkpoint_id="empty-2",
             storage_reader=ckptd.dcp.Reader(run="solo", socket=daemon.socket))  # fmt: skip
    assert target.loaded == {}


def test_the_restricted_loader_takes_what_dcp_saves_and_names_what_it_refuses(daemon) -> None:  # type: ignore[no-untyped-def]
    blob = io.BytesIO()
    torch.save([0.5, 0.25], blob)
    state = {"blob": blob, "size": torch.Size([2, 3]), "dtype": torch.bfloat16,
             "mixed": {"a": (1, "x", None), "b": {1, 2}, "f": frozenset({3}), "r": range(4)},
             "obj": fractions.Fraction(1, 3)}  # fmt: skip
    writer = ckptd.dcp.Writer(run="solo", socket=daemon.socket)
    dcp.save(state, checkpoint_id="values", storage_writer=writer)
    writer.close()

    def target() -> dict[str, Any]:
        mixed = dict.fromkeys(("a", "b", "f", "r"))  # DCP flattens nested dicts
        return {"blob": io.BytesIO(), "size": None, "dtype": None, "mixed": mixed, "obj": None}

    def reader(**kw: Any) -> ckptd.dcp.Reader:
        return ckptd.dcp.Reader(run="solo", socket=daemon.socket, **kw)

    # Without the Fraction, everything DCP itself produces loads by default.
    plain = target()
    del plain["obj"]
    dcp.load(plain, checkpoint_id="values", storage_reader=reader())
    plain["blob"].seek(0)
    assert torch.load(plain["blob"]) == [0.5, 0.25]
    assert plain["size"] == torch.Size([2, 3]) and plain["dtype"] is torch.bfloat16
    assert plain["mixed"] == state["mixed"]
    # Any other class is refused, naming both ways in, and the narrow one works.
    with pytest.raises(CheckpointException) as raised:
        dcp.load(target(), checkpoint_id="values", storage_reader=reader())
    failure = raised.value.failures[0]
    failure = failure[0] if isinstance(failure, tuple) else failure
    assert isinstance(failure, ckptd.errors.SerializationError)
    assert "Fraction" in str(failure) and "safe_globals" in str(failure)
    allowed = target()
    dcp.load(allowed, checkpoint_id="values",
             storage_reader=reader(safe_globals=[fractions.Fraction]))  # fmt: skip
    assert allowed["obj"] == fractions.Fraction(1, 3)


def test_a_second_save_of_a_tag_is_refused_up_front_like_file_system_writer(daemon) -> None:  # type: ignore[no-untyped-def]
    writer = ckptd.dcp.Writer(run="solo", socket=daemon.socket)
    dcp.save({"w": torch.ones(3)}, checkpoint_id="once", storage_writer=writer)
    placed: list[Any] = []
    writer._place = lambda *a: placed.append(a)  # type: ignore[method-assign]
    with pytest.raises(CheckpointException, match="Checkpoint already exists") as raised:
        dcp.save({"w": torch.zeros(3)}, checkpoint_id="once", storage_writer=writer)
    failure = raised.value.failures[0]
    failure = failure[0] if isinstance(failure, tuple) else failure
    assert isinstance(failure, ckptd.dcp.CheckpointExistsError)
    assert isinstance(failure, ckptd.errors.AlreadyExistsError) and isinstance(
        failure, RuntimeError
    )
    assert not placed, "nothing should be staged for a refused save"
    writer.close()
    target = {"w": torch.zeros(3)}
    dcp.load(target, checkpoint_id="once",
             storage_reader=ckptd.dcp.Reader(run="solo", socket=daemon.socket))  # fmt: skip
    assert torch.equal(target["w"], torch.ones(3))


@pytest.mark.slow
def test_a_rank_whose_shard_did_not_change_uploads_nothing_new(
    s3_bucket, make_daemon, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """Two checkpoints of the same state over two daemons and S3: the second lists the first's
    shards (same digests) and puts no new shard object into the store."""
    import boto3

    store = f"s3://{s3_bucket}/ckpts"
    a = make_daemon(store=store, name="a")
    b = make_daemon(store=store, name="b")
    base = {"run": "same", "store": store, "sockets": [a.socket, b.socket], "seed": 5}
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])

    def shared() -> dict[str, Any]:
        listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="ckpts/same/shared/")
        return {o["Key"]: o["LastModified"] for o in listed.get("Contents", [])}

    assert_ok(run_world(2, {**base, "action": "save", "tag": "step-1", "mode": "sync"},
                        tmp_path, "first"), tmp_path)  # fmt: skip
    before = shared()
    assert len(before) == 2  # one blob per rank's shard
    assert_ok(run_world(2, {**base, "action": "save", "tag": "step-2", "mode": "sync"},
                        tmp_path, "second"), tmp_path)  # fmt: skip
    assert shared() == before  # nothing new uploaded, nothing rewritten
    url = f"{store}/same"
    first, second = ckptd.list_checkpoints(url)
    shards = {n: r["blob"] for n, r in first["files"].items() if n.startswith("shard-")}
    assert shards and shards == {n: r["blob"] for n, r in second["files"].items() if "blob" in r}
    ckptd.verify(url, "step-2")
    assert_ok(run_world(2, {**base, "action": "load", "tag": "step-2"}, tmp_path, "load"), tmp_path)
    assert a.stop() == 0 and b.stop() == 0
