"""Resume anywhere, Lightning: a fit SIGKILLed on one machine continues on a fresh one (new
daemon, new root, no local files) from the S3 store through ``CkptdCheckpointIO``, with the
losses and learning rates of an uninterrupted fit; the store keeps what ``save_top_k`` keeps,
and ``save_last`` is a stub naming the newest tag, not a second upload."""

from __future__ import annotations

import json
import re
import shutil

import pytest

import ckptd
from tests import resume_worker as job

try:
    import lightning.pytorch  # noqa: F401
except ImportError:
    pytest.importorskip("pytorch_lightning")


def test_lightning_resumes_from_the_store_after_sigkill(make_daemon, s3_bucket, tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = f"s3://{s3_bucket}/runs"
    d_a = make_daemon(store=store, name="a")
    a = str(tmp_path / "a.jsonl")
    job.run_to_end(job.command("pl", "pl/A", d_a.socket, str(tmp_path / "out-a"), a))

    out, b = str(tmp_path / "out-b"), str(tmp_path / "b.jsonl")
    d_b = make_daemon(store=store, name="b1")
    in_store = f"{store}/pl/B"
    cmd = job.command("pl", "pl/B", d_b.socket, out, b)
    job.run_until_killed(cmd, 5, lambda: len(ckptd.list_checkpoints(in_store)) >= 2)
    d_b.kill()
    shutil.rmtree(d_b.root)
    shutil.rmtree(out)
    d_b2 = make_daemon(store=store, name="b2")
    job.run_to_end(job.command("pl", "pl/B", d_b2.socket, out, b))

    rec_a, rec_b = job.read_records(a), job.read_records(b)
    assert sorted(rec_a) == list(range(1, job.STEPS + 1))
    assert rec_b == rec_a  # loss and learning rate at every step
    with open(f"{b}.final.json") as f:
        final = json.load(f)
    assert final["global_step"] == job.STEPS
    assert final["resumed"] == "ckptd://latest"
    # The store holds exactly Lightning's top 2, and last.ckpt names the newest of them.
    kept = set(final["stubs"].values())
    tags = {m["tag"] for m in ckptd.list_checkpoints(in_store)}
    assert tags == kept and len(tags) == 2, (tags, final)
    assert {p.rsplit("/", 1)[-1][: -len(".ckpt")] for p in final["stubs"]} >= {"last"}
    last = next(t for p, t in final["stubs"].items() if p.endswith("last.ckpt"))
    assert last.endswith(f"_U{job.STEPS}")
    assert not any(t.startswith("last") for t in tags)  # save_last uploaded nothing twice
    with open(f"{a}.final.json") as f:
        assert json.load(f)["best_k"] == final["best_k"]
    for step in sorted(rec_a):
        print(f"step {step}: A loss={rec_a[step]['loss']:.6f} lr={rec_a[step]['lr']:.3e} | "
              f"B loss={rec_b[step]['loss']:.6f} lr={rec_b[step]['lr']:.3e}")  # fmt: skip


def test_lightning_fresh_rerun_without_resume_fails_at_the_first_save(daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The old IO trained from scratch and failed only at teardown, on the collision."""
    rec = str(tmp_path / "r.jsonl")
    cmd = job.command("pl", "pl/C", daemon.socket, str(tmp_path / "out"), rec)
    job.run_to_end(cmd)
    from ckptd import Checkpointer
    from ckptd.errors import SaveError
    from ckptd.integrations.lightning import CkptdCheckpointIO

    with Checkpointer("pl/C", socket=daemon.socket) as ckpt:
        io = CkptdCheckpointIO(ckpt)
        before = {m["tag"] for m in ckptd.list_checkpoints(f"{daemon.root}/pl/C")}
        taken = sorted(before)[0]
        stem, step = taken.rsplit("_U", 1)
        again = {"global_step": int(step), "epoch": 0, "loops": {}, "state_dict": {}}
        with pytest.raises(SaveError, match=re.escape(taken) + " already exists.*resume_path"):
            io.save_checkpoint(again, str(tmp_path / "new" / f"{stem}.ckpt"))
        assert io.resume_path() == "ckptd://latest"
    assert {m["tag"] for m in ckptd.list_checkpoints(f"{daemon.root}/pl/C")} == before
