"""``ckptd exec --shutdown``: stale upload failures (checkpoints owed from before the job) do not
block power-off forever; this job's own failures do, with advice that works at that moment.

The stale failure is real: a checkpoint committed for a bucket that does not exist on the moto
server, left owed on the root by an earlier daemon. The power-off command is the harmless
marker script of ``test_exec``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

from ckptd import Checkpointer
from ckptd.execcmd import run_exec
from ckptd.spawn import socket_ready
from tests.helpers import Net
from tests.test_exec import exec_kwargs, scripts  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow


def test_exec_powers_off_past_a_stale_failure_and_reports_it(
    scripts: dict[str, str],  # noqa: F811
    s3_bucket: str,
    make_daemon,  # type: ignore[no-untyped-def]
    short_dir: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An earlier mistake: a typo'd bucket. Its checkpoint stays owed on the root.
    old = make_daemon(store=f"s3://{s3_bucket}-typo/p", args=["--no-check-store"], name="old")
    with Checkpointer("old", socket=old.socket) as ckpt:
        ckpt.save(1, model=Net()).wait("committed", timeout=60)
    old.kill()
    caplog.set_level(logging.INFO, logger="ckptd.exec")
    sock = os.path.join(short_dir, "exec.sock")
    store = tmp_path / "store"
    rc = run_exec(
        [sys.executable, scripts["train.py"], str(store), "0"],
        socket=sock,
        root=old.root,
        **exec_kwargs(scripts, store=str(store)),  # type: ignore[arg-type]
    )
    assert rc == 0, caplog.text
    assert os.path.exists(scripts["marker"])  # powered off
    assert (store / "job" / "checkpoints" / "step-00000002" / "MANIFEST.json").exists()
    text = caplog.text
    assert "left from before this job" in text and "old" in text, text
    assert f"ckptd abandon --root {old.root} old@step-00000001" in text
    assert not socket_ready(sock)
    # Still owed (nothing was given up silently): the record is on the root.
    assert os.path.exists(os.path.join(old.root, ".ckptd", "uploads", "old", "step-00000001.json"))


def test_exec_own_failure_with_its_daemon_gone_names_commands_that_work(
    scripts: dict[str, str],  # noqa: F811
    s3_bucket: str,
    short_dir: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ckptd.exec")
    sock = os.path.join(short_dir, "exec.sock")
    root = str(tmp_path / "root")
    rc = run_exec(
        [sys.executable, scripts["train.py"], f"s3://{s3_bucket}-typo/p", "0"],
        socket=sock,
        root=root,
        **exec_kwargs(scripts, drain_timeout=60.0),  # type: ignore[arg-type]
    )
    assert rc == 1
    assert not os.path.exists(scripts["marker"])
    text = caplog.text
    assert "NOT powering off" in text and "bucket missing" in text, text
    # The daemon exec started has exited: no bare "run ckptd drain" against nothing.
    assert "has exited" in text and f"ckptd serve --root {root} --socket {sock}" in text
    assert f"ckptd abandon --root {root} job@step-0000000" in text
    assert not socket_ready(sock)
