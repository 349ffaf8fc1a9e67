"""``ckptd exec [--shutdown] -- CMD``: run the job, drain, power off only when it is safe.

The power-off command is a harmless script that writes a marker file. Training saves through
``ckptd.Checkpointer``, which finds the daemon through ``CKPTD_SOCKET`` set by exec.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ckptd.errors import ConfigError
from ckptd.execcmd import run_exec
from ckptd.spawn import socket_ready
from ckptd.testing.servers import free_port

BOUND_S = 60.0

TRAIN = """
import sys
import torch
import ckptd

store = sys.argv[1] if sys.argv[1] != "-" else None
model = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
with ckptd.Checkpointer("job", store=store) as ckpt:  # the socket comes from CKPTD_SOCKET
    for step in (1, 2):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ckpt.save(step, model=model, optimizer=opt)
sys.exit(int(sys.argv[2]))
"""

# Waits for SIGTERM (as a job does when the machine is being stopped), then exits 3.
TRAP = """
import os, signal, sys, time
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append(1))
open(sys.argv[1], "w").write(os.environ["CKPTD_SOCKET"])
deadline = time.monotonic() + 60
while not got and time.monotonic() < deadline:
    time.sleep(0.01)
sys.exit(3 if got else 9)
"""

RUN_EXEC = """
import json, logging, sys
from ckptd.execcmd import run_exec
logging.basicConfig(level=logging.INFO)
kw = json.loads(sys.argv[1])
sys.exit(run_exec(kw.pop("cmd"), **kw))
"""


@pytest.fixture
def scripts(tmp_path: Path) -> dict[str, str]:
    out = {}
    for name, text in (("train.py", TRAIN), ("trap.py", TRAP)):
        (tmp_path / name).write_text(textwrap.dedent(text))
        out[name] = str(tmp_path / name)
    marker = tmp_path / "powered-off"
    poweroff = tmp_path / "poweroff.sh"
    poweroff.write_text(f'#!/bin/sh\necho "$@" > {marker}\n')
    out["marker"] = str(marker)
    out["poweroff"] = str(poweroff)
    return out


def exec_kwargs(scripts: dict[str, str], **kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "store": None,
        "shutdown": True,
        "poweroff_cmd": ["/bin/sh", scripts["poweroff"], "now"],
        "drain_timeout": None,
        "force_after": None,
    }
    return {**base, **kw}


def run_exec_process(kw: dict[str, object]) -> subprocess.Popen[str]:
    """``run_exec`` in its own process, as the CLI will run it."""
    return subprocess.Popen(
        [sys.executable, "-c", RUN_EXEC, json.dumps(kw)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_daemon_of(root: str, sock: str) -> None:
    """After a failure: a daemon started by a killed exec runs on in its own session; end it."""
    if not socket_ready(sock):
        return
    with open(os.path.join(root, ".ckptd", "lock")) as f:
        pid = int(f.read().strip())
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_exec_starts_a_daemon_drains_and_powers_off(
    scripts: dict[str, str], short_dir: str, tmp_path: Path
) -> None:
    sock = os.path.join(short_dir, "exec.sock")
    store = tmp_path / "store"
    rc = run_exec(
        [sys.executable, scripts["train.py"], "-", "0"],
        socket=sock,
        root=str(tmp_path / "root"),
        **exec_kwargs(scripts, store=str(store)),  # type: ignore[arg-type]
    )
    assert rc == 0
    assert Path(scripts["marker"]).read_text().strip() == "now"  # powered off, with its argument
    for tag in ("step-00000001", "step-00000002"):
        assert (store / "job" / "checkpoints" / tag / "MANIFEST.json").exists()
    assert (store / "job" / "latest").read_text().strip() == "step-00000002"
    assert not socket_ready(sock)  # the daemon it started is gone


def test_exec_never_powers_off_with_uploads_pending_unless_forced(
    scripts: dict[str, str],
    make_daemon,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A store nobody answers for: every upload attempt is refused, so the drain cannot finish.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    daemon = make_daemon()
    caplog.set_level(logging.INFO, logger="ckptd.exec")
    rc = run_exec(
        [sys.executable, scripts["train.py"], "s3://nonexistent-bucket/p", "0"],
        socket=daemon.socket,
        root=daemon.root,
        **exec_kwargs(scripts, drain_timeout=1.5),  # type: ignore[arg-type]
    )
    assert rc == 1
    assert "NOT powering off" in caplog.text and "job@step-00000002" in caplog.text
    assert not os.path.exists(scripts["marker"])
    assert socket_ready(daemon.socket)  # exec did not start this daemon, so it leaves it running

    # --force-after: power off anyway once that much draining has passed, and say so loudly.
    # (The first job's checkpoints are stale for this one: reported, never waited for.)
    caplog.clear()
    started = time.monotonic()
    save_job2 = (
        "import ckptd, torch\n"
        "with ckptd.Checkpointer('job2', store='s3://nonexistent-bucket/p') as c:\n"
        "    c.save(1, model=torch.nn.Linear(2, 2))\n"
    )
    rc = run_exec(
        [sys.executable, "-c", save_job2],
        socket=daemon.socket,
        root=daemon.root,
        **exec_kwargs(scripts, force_after=1.0),  # type: ignore[arg-type]
    )
    assert rc == 1
    assert time.monotonic() - started >= 1.0
    assert os.path.exists(scripts["marker"])
    assert "FORCED POWER-OFF" in caplog.text
    assert "job2@step-00000001" in caplog.text  # what is left is named
    assert "already owes 2 checkpoint(s) from before this job" in caplog.text


def test_exec_forwards_sigterm_and_propagates_the_exit_code(
    scripts: dict[str, str], short_dir: str, tmp_path: Path
) -> None:
    sock = os.path.join(short_dir, "exec.sock")
    ready = tmp_path / "ready"
    kw = exec_kwargs(
        scripts,
        cmd=[sys.executable, scripts["trap.py"], str(ready)],
        socket=sock,
        root=str(tmp_path / "root"),
    )
    proc = run_exec_process(kw)
    try:
        deadline = time.monotonic() + BOUND_S
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the command never started"
            time.sleep(0.02)  # polling for the file, with a bound
        assert ready.read_text() == sock  # CKPTD_SOCKET was set for the command
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=BOUND_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_daemon_of(str(tmp_path / "root"), sock)
    assert proc.returncode == 3, out  # the command's own code, not exec's
    assert "passing SIGTERM on" in out
    assert os.path.exists(scripts["marker"])  # drained (nothing pending), so it powered off
    assert not socket_ready(sock)


def test_exec_refuses_bad_arguments(scripts: dict[str, str], short_dir: str) -> None:
    sock = os.path.join(short_dir, "none.sock")
    with pytest.raises(ConfigError, match="command"):
        run_exec([], socket=sock, root=short_dir, **exec_kwargs(scripts))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="negative"):
        run_exec(
            ["true"],
            socket=sock,
            root=short_dir,
            **exec_kwargs(scripts, drain_timeout=-1),  # type: ignore[arg-type]
        )
