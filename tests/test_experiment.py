"""Experiment records: config, git, env, seed, main.log, metrics (crash-safe), results."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml

import ckptd
from ckptd import Checkpointer
from ckptd.experiment import Experiment, list_records, load_config
from tests.helpers import bitwise_equal

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(cwd: str, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@e", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_records_through_the_daemon(daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    cfg = {"model": {"width": 16, "depth": 2}, "lr": 0.01, "tags": ["a", "b"]}
    exp = Experiment(
        "proj", "baseline", config=cfg, seed=1234, socket=daemon.socket, git_dir=str(outside)
    )
    try:
        assert exp.run.startswith("proj/baseline/")
        assert exp.dir == os.path.join(daemon.root, exp.run, "experiment")
        assert torch.initial_seed() == 1234 and exp.seed == 1234
        assert yaml.safe_load(_read(exp.path("config_resolved.yaml"))) == cfg
        tree = _read(exp.path("config_tree.txt"))
        assert "model" in tree and "width: 16" in tree
        git = json.loads(_read(exp.path("git.json")))
        assert git["available"] is False and git["reason"]
        env = json.loads(_read(exp.path("env.json")))
        assert env["torch"] == torch.__version__ and env["seed"] == 1234 and env["argv"]
        assert "packages" in env and env["packages"]["torch"]
        logging.getLogger("trainer").info("epoch 0 started")
        exp.log_scalar("loss", torch.tensor(0.5))
        exp.log_scalar("acc", 0.25)
        exp.flush()
        exp.log_scalar("loss", torch.tensor([0.25], dtype=torch.float64))
        exp.flush()
        model = torch.nn.Linear(4, 3)
        h = exp.checkpointer.save(2, model=model)
        h.wait("committed", timeout=60)
    finally:
        handlers = len(logging.getLogger().handlers)
        assert exp.finish() is True  # the root is the store: the folder already lies in it
    assert len(logging.getLogger().handlers) < handlers  # main.log's handler is gone
    assert "epoch 0 started" in _read(exp.path("main.log"))
    rows = _metrics(exp.path("metrics.jsonl"))
    assert [(r["step"], r["key"], r["value"]) for r in rows] == [
        (0, "loss", 0.5),
        (0, "acc", 0.25),
        (1, "loss", 0.25),
    ]
    assert json.loads(_read(exp.path("run.json")))["status"] == "finished"
    run_url = os.path.join(daemon.root, exp.run)
    assert load_config(run_url) == cfg
    assert load_config(f"{run_url}@step-00000002") == cfg
    assert load_config(os.path.join(run_url, "checkpoints", "step-00000002")) == cfg
    keys = dict(list_records(run_url))
    assert {"config_resolved.yaml", "git.json", "env.json", "metrics.jsonl", "main.log"} <= set(
        keys
    )
    assert keys["config_resolved.yaml"] == os.path.getsize(exp.path("config_resolved.yaml"))
    assert bitwise_equal(ckptd.load(run_url)["model"], model.state_dict())


@needs_git
def test_git_commit_branch_remote_dirty_and_diff(tmp_path) -> None:  # type: ignore[no-untyped-def]
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(str(repo), "init", "-q", "-b", "main")
    (repo / "train.py").write_text("print('v1')\n")
    _git(str(repo), "add", "train.py")
    _git(str(repo), "commit", "-q", "-m", "v1")
    _git(str(repo), "remote", "add", "origin", "https://example.invalid/repo.git")
    commit = _git(str(repo), "rev-parse", "HEAD").strip()
    (repo / "train.py").write_text("print('v2')\n")  # uncommitted
    exp = Experiment(
        "p",
        "git",
        connect=False,
        base_dir=str(tmp_path / "exps"),
        git_dir=str(repo),
        capture_logs=False,
    )
    exp.finish()
    git = json.loads(_read(exp.path("git.json")))
    assert git["available"] is True and git["commit"] == commit
    assert git["branch"] == "main" and git["remote"] == "https://example.invalid/repo.git"
    assert git["dirty"] is True and git["diff_file"] == "git.diff"
    diff = _read(exp.path("git.diff"))
    assert "-print('v1')" in diff and "+print('v2')" in diff
    assert exp.dir == os.path.join(str(tmp_path / "exps"), exp.run)


@dataclasses.dataclass
class _Opt:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)


@dataclasses.dataclass
class _Cfg:
    name: str = "tiny"
    opt: _Opt = dataclasses.field(default_factory=_Opt)


def _config_of(tmp_path, config) -> dict:  # type: ignore[no-untyped-def]
    exp = Experiment(
        "p", "cfg", config=config, connect=False, base_dir=str(tmp_path), capture_logs=False,
        timestamp=f"t{time.monotonic_ns()}",
    )  # fmt: skip
    exp.finish()
    return yaml.safe_load(_read(exp.path("config_resolved.yaml")))


def test_config_from_dict_dataclass_and_omegaconf(tmp_path) -> None:  # type: ignore[no-untyped-def]
    want = {"name": "tiny", "opt": {"lr": 1e-3, "betas": [0.9, 0.99]}}
    assert _config_of(tmp_path, want) == want
    assert _config_of(tmp_path, _Cfg()) == want
    omegaconf = pytest.importorskip("omegaconf")
    oc = omegaconf.OmegaConf.create({"base": 16, "width": "${base}", "opt": want["opt"]})
    assert _config_of(tmp_path, oc) == {"base": 16, "width": 16, "opt": want["opt"]}  # resolved
    with pytest.raises(ckptd.ConfigError):
        _config_of(tmp_path, 42)


def test_save_results_one_file_or_one_per_part(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    exp = Experiment("p", "res", connect=False, base_dir=str(tmp_path), capture_logs=False)
    results = {
        "results": {"acc": np.float32(0.5), "loss": torch.tensor(0.25)},
        "hyperparameters": {"lr": 0.1},
        "training_history": {"loss": [1.0, 0.5]},
        "predictions": torch.arange(4),
    }
    (one,) = exp.save_results(results)
    assert one == exp.path("results", "results.json")
    assert json.loads(_read(one)) == {
        "results": {"acc": 0.5, "loss": 0.25},
        "hyperparameters": {"lr": 0.1},
        "training_history": {"loss": [1.0, 0.5]},
        "predictions": [0, 1, 2, 3],
    }
    paths = exp.save_results(results, separate_files=True)
    assert sorted(os.path.basename(p) for p in paths) == sorted(
        f"{p}.json" for p in ("results", "hyperparameters", "training_history", "predictions")
    )
    assert json.loads(_read(exp.path("results", "predictions.json"))) == [0, 1, 2, 3]
    assert not [n for n in os.listdir(exp.path("results")) if n.endswith(".tmp")]
    exp.finish()


def test_save_experiment_final_model_and_results(daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    with Experiment("p", "final", socket=daemon.socket, capture_logs=False) as exp:
        h = exp.save_experiment(model=model, optimizer=opt, results={"acc": 0.9}, step=7)
        assert h.tag == "final" and h.state in ("committed", "uploaded")
    state = ckptd.load(os.path.join(daemon.root, exp.run), tag="final")
    assert bitwise_equal(state["model"], model.state_dict())
    assert bitwise_equal(state["optimizer"], opt.state_dict())
    assert json.loads(_read(exp.path("results", "results.json"))) == {"acc": 0.9}


_CRASHER = textwrap.dedent(
    """
    import sys, time
    from ckptd.experiment import Experiment
    if sys.argv[2:]:  # through a daemon that mirrors the folder
        exp = Experiment("p", "crash", socket=sys.argv[2], capture_logs=False, timestamp="ts")
    else:
        exp = Experiment("p", "crash", connect=False, base_dir=sys.argv[1], capture_logs=False,
                         timestamp="ts")
    for step in range(500):
        exp.log_scalar("loss", 1.0 / (step + 1), step=step)
        if step % 10 == 9:
            exp.flush()
    print("logged", flush=True)
    time.sleep(120)  # killed long before this ends
    """
)


def _crash(*args: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHER, *args], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "logged"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _all_logged(path: str) -> bool:
    try:
        rows = _metrics(path)
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return [r["step"] for r in rows] == list(range(500)) and rows[-1]["value"] == 1 / 500


def test_metrics_survive_sigkill(tmp_path) -> None:  # type: ignore[no-untyped-def]
    _crash(str(tmp_path))
    assert _all_logged(str(tmp_path / "p" / "crash" / "ts" / "metrics.jsonl"))


def test_metrics_of_a_killed_run_reach_the_store(make_daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The trainer is SIGKILLed: the daemon sees its connection drop and mirrors what it wrote."""
    store = str(tmp_path / "store")
    d = make_daemon(store=store)
    with Checkpointer("probe", socket=d.socket) as probe:
        if "mirror" not in probe.daemon_info.get("features", ()):
            pytest.skip("this daemon has no mirror op yet")
    _crash(str(tmp_path), d.socket)
    remote = os.path.join(store, "p", "crash", "ts", "experiment", "metrics.jsonl")
    deadline = time.monotonic() + 30
    while not _all_logged(remote):  # uploaded in the background: poll with a bound
        assert time.monotonic() < deadline, "metrics of the killed run never reached the store"
        time.sleep(0.05)


def test_mirrored_to_another_store(make_daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With a store other than the root, the daemon mirrors the folder (socket op ``mirror``)."""
    store = str(tmp_path / "store")
    d = make_daemon(store=store)
    exp = Experiment("p", "mirrored", socket=d.socket, config={"a": 1})
    if "mirror" not in exp.checkpointer.daemon_info.get("features", ()):
        exp.finish()
        pytest.skip("this daemon has no mirror op yet")
    try:
        assert exp.mirroring
        logging.getLogger("trainer").warning("half way")
        exp.log_scalar("loss", 1.0)
        exp.save_results({"acc": 1.0})
        assert exp.sync(timeout=30)
        remote = os.path.join(store, exp.run, "experiment")
        assert _read(os.path.join(remote, "results", "results.json")) == _read(
            exp.path("results", "results.json")
        )
    finally:
        assert exp.finish(timeout=30)
    for rel in ("metrics.jsonl", "main.log", "run.json", "git.json", "env.json"):
        assert _read(os.path.join(remote, rel)) == _read(exp.path(rel)), rel
    assert load_config(f"{store}/{exp.run}") == {"a": 1}
    assert dict(list_records(f"file://{store}/{exp.run}"))["run.json"] > 0


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_every_record_reaches_s3_and_gcs(scheme: str, request, make_daemon) -> None:  # type: ignore[no-untyped-def]
    """Done when: every record is in the real S3 and GCS servers, equal to its local copy."""
    import asyncio

    from ckptd.storage import open_store

    bucket = request.getfixturevalue("s3_bucket" if scheme == "s3" else "gcs_bucket")
    store = f"{scheme}://{bucket}/exp"
    d = make_daemon(store=store)
    exp = Experiment("proj", "cloud", socket=d.socket, config={"lr": 0.1, "layers": [1, 2]}, seed=3)
    logging.getLogger("trainer").warning("hello from the run")
    for step in range(3):
        exp.log_scalar("loss", 1.0 / (step + 1), step=step)
        exp.flush()
    exp.save_results({"acc": 0.5}, separate_files=False)
    with open(exp.path("notes.txt"), "w") as f:  # a file the user writes into exp.dir
        f.write("written by the trainer\n")
    assert exp.finish(timeout=60)
    local_root = exp.dir

    async def fetch_all() -> dict[str, bytes]:
        async with open_store(store) as st:
            prefix = f"{exp.run}/experiment/"
            objs = await st.list(prefix)
            return {o.key[len(prefix) :]: await st.get_bytes(o.key) for o in objs}

    remote = asyncio.run(fetch_all())
    local = {}
    for dirpath, _, files in os.walk(local_root):
        for name in files:
            full = os.path.join(dirpath, name)
            local[os.path.relpath(full, local_root)] = _read_bytes(full)
    for rel in ("config_resolved.yaml", "config_tree.txt", "git.json", "env.json", "main.log",
                "metrics.jsonl", "results.json" if "results.json" in local else "results/results.json",
                "notes.txt"):  # fmt: skip
        assert rel in local, (rel, sorted(local))
    assert sorted(remote) == sorted(local)
    for rel, data in local.items():
        assert remote[rel] == data, rel


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
