"""Resume anywhere, Hugging Face Trainer: a job SIGKILLed on one machine continues on a fresh one
(new daemon, new root, no local files) from the S3 store, with the losses, learning rates and
grad norms of an uninterrupted run; and saves that would collide stop training at once."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest
import torch

import ckptd
from ckptd import Checkpointer
from ckptd.errors import SaveError
from tests import resume_worker as job

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def test_hf_resumes_from_the_store_after_sigkill(make_daemon, s3_bucket, tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = f"s3://{s3_bucket}/runs"
    d_a = make_daemon(store=store, name="a")
    a = str(tmp_path / "a.jsonl")
    job.run_to_end(job.command("hf", "hf/A", d_a.socket, str(tmp_path / "out-a"), a))

    out, b = str(tmp_path / "out-b"), str(tmp_path / "b.jsonl")
    d_b = make_daemon(store=store, name="b1")
    cmd = job.command("hf", "hf/B", d_b.socket, out, b)
    in_store = f"{store}/hf/B"
    job.run_until_killed(cmd, 5, lambda: len(ckptd.list_checkpoints(in_store)) >= 2)
    # The machine is gone: its daemon, its root, the Trainer's own folders.
    d_b.kill()
    shutil.rmtree(d_b.root)
    shutil.rmtree(out)
    d_b2 = make_daemon(store=store, name="b2")  # a fresh machine: new root, same store
    cmd = job.command("hf", "hf/B", d_b2.socket, out, b)
    job.run_to_end(cmd)

    rec_a, rec_b = job.read_records(a), job.read_records(b)
    assert sorted(rec_a) == list(range(1, job.STEPS + 1))
    assert rec_b == rec_a  # every step: loss, learning rate, grad norm
    final_a = _final(a)
    final_b = _final(b)
    assert final_b["global_step"] == job.STEPS
    assert final_a["resumed"] is None and final_b["resumed"] == f"{out}/checkpoint-4"
    # The restored history and the new steps; the closing summary averages this call's steps.
    assert final_b["log_history"][:-1] == final_a["log_history"][:-1]
    assert "train_loss" in final_b["log_history"][-1]
    tags = [m["tag"] for m in ckptd.list_checkpoints(in_store)]
    assert tags == [f"checkpoint-{s}" for s in range(2, job.STEPS + 1, 2)]  # no collision
    resumed = ckptd.load(in_store, tag=f"checkpoint-{job.STEPS}")
    done = ckptd.load(f"{store}/hf/A", tag=f"checkpoint-{job.STEPS}")
    assert all(torch.equal(resumed["model"][k], v) for k, v in done["model"].items())
    _report(rec_a, rec_b)


def _final(path: str) -> dict[str, Any]:
    import json

    with open(f"{path}.final.json") as f:
        return dict(json.load(f))


def _report(rec_a: dict[int, Any], rec_b: dict[int, Any]) -> None:
    for step in sorted(rec_a):
        print(f"step {step}: A loss={rec_a[step]['loss']} lr={rec_a[step]['lr']:.3e} | "
              f"B loss={rec_b[step]['loss']} lr={rec_b[step]['lr']:.3e}")  # fmt: skip


# ---- collisions and failures reach the loop ------------------------------------------------------


def _trainer(tmp_path, cb, max_steps: int):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (16, 16), generator=gen)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=4,
        save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
        seed=0,
    )  # fmt: skip
    data = [{"input_ids": row, "labels": row} for row in ids]
    model = transformers.GPT2LMHeadModel(config)
    return transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])


def test_hf_rerun_without_resume_stops_at_the_first_colliding_save(daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The old callback trained to the end and raised "already exists" only in on_train_end."""
    from ckptd.integrations.hf import CkptdCallback

    with Checkpointer("hf/twice", socket=daemon.socket) as ckpt:
        _trainer(tmp_path, CkptdCallback(ckpt, wait="committed"), 4).train()
    steps: list[int] = []

    class Count(transformers.TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            steps.append(state.global_step)

    with Checkpointer("hf/twice", socket=daemon.socket) as ckpt:
        trainer = _trainer(tmp_path, CkptdCallback(ckpt), 8)
        trainer.add_callback(Count())
        with pytest.raises(SaveError, match=r"checkpoint-2 already exists.*resume_checkpoint"):
            trainer.train()  # not resumed: its first save would collide
    assert max(steps) == 2
    tags = [m["tag"] for m in ckptd.list_checkpoints(os.path.join(daemon.root, "hf/twice"))]
    assert tags == ["checkpoint-2", "checkpoint-4"]


def test_hf_background_failure_stops_training_at_the_next_step(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A save that fails after ``save()`` returned is raised at the next step, not at the end."""
    from ckptd.client import SaveHandle
    from ckptd.integrations.hf import CkptdCallback

    class Failing:
        run, store, daemon_info, saves = "hf/fake", None, {"root": str(tmp_path)}, True

        def save(self, step: int, **kw: Any) -> SaveHandle:
            h = SaveHandle(kw["tag"], step)
            h._fail(SaveError(f"disk full while writing {kw['tag']}"))  # as the daemon reports
            return h

    steps: list[int] = []

    class Count(transformers.TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            steps.append(state.global_step)

    trainer = _trainer(tmp_path, CkptdCallback(Failing()), 8)
    trainer.add_callback(Count())
    with pytest.raises(SaveError, match="disk full while writing checkpoint-2"):
        trainer.train()
    assert max(steps) == 2  # raised at the end of step 3, the first step after the failed save
