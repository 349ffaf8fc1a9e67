"""Resume on a fresh machine from the store, and a rerun never overwrites the store.

The story of each test: run A uninterrupted; run B killed with SIGKILL after two uploaded saves,
its daemon's root deleted (the machine is gone), a new daemon on a new root with the same store
(the real S3 server), the same command rerun. The resumed run's losses and learning rates equal
run A's at the same steps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import boto3
import pytest
import torch

import ckptd
from ckptd import Checkpointer

STEPS = 10


def _job(mode: str, run: str, sock: str, out: str, die_after: int | None = None) -> int:
    cmd = [sys.executable, "-m", "tests.loop_worker", mode, run, sock, out, str(STEPS)]
    if die_after is not None:
        cmd.append(str(die_after))
    return subprocess.run(
        cmd, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__))
    ).returncode


def _log(path: str) -> dict[int, tuple[float, float]]:
    out: dict[int, tuple[float, float]] = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = (rec["loss"], rec["lr"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["loop", "attach"])
def test_a_killed_job_resumes_on_a_fresh_machine(mode, s3_bucket, make_daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = f"s3://{s3_bucket}/ckpts"
    a = make_daemon(store=store, name="a")
    assert _job(mode, "run-a", a.socket, str(tmp_path / "a.jsonl")) == 0
    b = make_daemon(store=store, name="b")
    assert _job(mode, "run-b", b.socket, str(tmp_path / "b.jsonl"), die_after=2) == -9
    b.kill()
    shutil.rmtree(b.root)  # the machine and its disk are gone
    fresh = make_daemon(store=store, name="fresh")
    assert _job(mode, "run-b", fresh.socket, str(tmp_path / "b.jsonl")) == 0
    want, got = _log(str(tmp_path / "a.jsonl")), _log(str(tmp_path / "b.jsonl"))
    assert sorted(got) == list(range(STEPS))
    assert got == want  # the same losses and learning rates at every step, bitwise
    tags = [c["tag"] for c in ckptd.list_checkpoints(f"{store}/run-b")]
    assert tags == [f"step-{n:08d}" for n in range(2, STEPS + 1, 2)]


def _objects(bucket: str, prefix: str) -> dict[str, str]:
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: o["ETag"] for o in listing}


def test_a_rerun_from_scratch_never_overwrites_the_store(s3_bucket, make_daemon) -> None:  # type: ignore[no-untyped-def]
    """Before: the new daemon checked tags in its own root only and uploaded step-1's files
    over the committed checkpoint's objects; only the manifest write then failed."""
    store = f"s3://{s3_bucket}/ckpts"
    first = make_daemon(store=store, name="first")
    with Checkpointer("same", socket=first.socket) as ckpt:
        for step in (1, 2):
            ckpt.save(step, model=torch.nn.Linear(4, 4)).wait("uploaded", timeout=60)
    before = _objects(s3_bucket, "ckpts/same/checkpoints/")
    first.kill()
    shutil.rmtree(first.root)
    second = make_daemon(store=store, name="second")
    with Checkpointer("same", socket=second.socket) as ckpt:
        with pytest.raises(ckptd.SaveError, match="already exists"):
            ckpt.save(1, model=torch.nn.Linear(4, 4)).wait("uploaded", timeout=60)
        ckpt.save(3, model=torch.nn.Linear(4, 4)).wait("uploaded", timeout=60)
    after = _objects(s3_bucket, "ckpts/same/checkpoints/")
    assert {k: v for k, v in after.items() if "step-00000003" not in k} == before
    assert not os.path.exists(os.path.join(second.root, "same", "checkpoints", "step-00000001"))
