"""The ``ckptd`` command as a user runs it: help, exit codes, and the store verbs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ckptd import Checkpointer
from ckptd.cli import build_parser

VERBS = sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


def ckptd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptd", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_every_verb_has_help() -> None:
    assert {"serve", "status", "drain", "ls", "verify", "restore", "gc", "demo"} <= set(VERBS)
    top = ckptd("--help")
    assert top.returncode == 0
    for verb in VERBS:
        out = ckptd(verb, "--help")
        assert out.returncode == 0, verb
        assert "usage: ckptd " + verb in out.stdout and "exit codes" in out.stdout


@pytest.mark.parametrize(
    "args",
    [(), ("frobnicate",), ("serve", "--writers", "many"), ("verify",), ("restore", "x"),
     ("serve", "--store", "ftp://host/x"), ("serve", "--writers", "0")],
)  # fmt: skip
def test_bad_usage_exits_2(args: tuple[str, ...]) -> None:
    out = ckptd(*args)
    assert out.returncode == 2, (args, out.stderr)
    assert out.stderr.strip()


def test_no_daemon_exits_1_with_a_hint(short_dir: str) -> None:
    sock = os.path.join(short_dir, "none.sock")
    for verb in ("status", "drain"):
        out = ckptd(verb, "--socket", sock)
        assert out.returncode == 1 and sock in out.stderr and "ckptd serve" in out.stderr


def test_store_verbs(daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with Checkpointer("clirun", socket=daemon.socket) as ckpt:
        ckpt.save(1, model=torch.nn.Linear(3, 3)).wait()
        ckpt.save(2, model=torch.nn.Linear(3, 3)).wait()
    run = os.path.join(daemon.root, "clirun")
    ls = ckptd("ls", daemon.root)
    assert ls.returncode == 0 and ls.stdout.split() == ["clirun"]
    ls = ckptd("ls", run, "--json")
    listing = json.loads(ls.stdout)
    assert [m["tag"] for m in listing["checkpoints"]] == ["step-00000001", "step-00000002"]
    (tmp_path / "empty").mkdir()
    assert ckptd("ls", str(tmp_path / "empty")).returncode == 1
    ok = ckptd("verify", f"{run}@step-00000001")
    assert ok.returncode == 0 and "step-00000001" in ok.stdout
    dest = tmp_path / "out"
    out = ckptd("restore", run, str(dest))
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(dest)) == ["MANIFEST.json", "model.weights.safetensors"]
    assert json.loads((dest / "MANIFEST.json").read_text())["tag"] == "step-00000002"
    assert ckptd("verify", str(dest)).returncode == 0  # a restored directory verifies on its own
    missing = ckptd("verify", f"{run}@step-00000009")
    assert missing.returncode == 1 and "step-00000009" in missing.stderr
    st = ckptd("status", "--socket", daemon.socket, "--json")
    assert st.returncode == 0
    status = json.loads(st.stdout)
    assert status["counts"] == {"uploaded": 2} and status["root"] == daemon.root
    human = ckptd("status", "--socket", daemon.socket)
    assert "clirun@step-00000002" in human.stdout
    assert ckptd("drain", "--socket", daemon.socket, "--timeout", "10").returncode == 0


def test_env_vars_select_socket(daemon) -> None:  # type: ignore[no-untyped-def]
    out = ckptd("status", env={"CKPTD_SOCKET": daemon.socket})
    assert out.returncode == 0 and daemon.socket in out.stdout


def test_serve_yields_the_cpu_to_training(make_daemon) -> None:  # type: ignore[no-untyped-def]
    """The daemon runs at a lower CPU priority (``--nice``, default 10), so a save's writer and
    checksum threads do not take the loop's cores; a bad ``CKPTD_NICE`` is a usage error."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    d = make_daemon(args=["--nice", "3"])
    assert d.proc is not None
    assert os.getpriority(os.PRIO_PROCESS, d.proc.pid) == min(base + 3, 19)
    assert f"running at nice {min(base + 3, 19)}" in d.log_text()
    out = ckptd("serve", "--root", d.root, "--socket", d.socket + "x", env={"CKPTD_NICE": "low"})
    assert out.returncode == 2 and "CKPTD_NICE must be an integer" in out.stderr
