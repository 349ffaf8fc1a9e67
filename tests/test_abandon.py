"""``ckptd abandon RUN[@TAG]``: give up an owed upload on purpose. The local copy stays, the root
records it (a restarted daemon does not owe it again), and a waiting drain stops waiting.

The store is the real moto server behind the fault proxy, cut off for the whole test: uploads
can only end by being abandoned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from ckptd import Checkpointer
from tests.helpers import Net
from tests.test_why import _ckptd

pytestmark = pytest.mark.slow


def _committed(root: str, run: str, tag: str) -> bool:
    return os.path.exists(os.path.join(root, run, "checkpoints", tag, "MANIFEST.json"))


def test_abandon_stops_a_waiting_drain_and_survives_a_restart(
    s3_proxy, s3_bucket, make_daemon
) -> None:  # type: ignore[no-untyped-def]
    store = f"s3://{s3_bucket}/ab"
    d = make_daemon(store=store, args=["--no-check-store"])
    s3_proxy.down()
    with Checkpointer("ab", socket=d.socket) as ckpt:
        for step in (1, 2):
            ckpt.save(step, model=Net()).wait("committed", timeout=60)
    waiting = subprocess.Popen(
        [sys.executable, "-m", "ckptd", "drain", "--timeout", "120", "--socket", d.socket],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        out = _ckptd("abandon", "--socket", d.socket, "ab@step-00000001")
        assert out.returncode == 0, out.stderr
        assert f"abandoned the upload of ab@step-00000001 to {store}" in out.stdout
        assert waiting.poll() is None  # step 2 is still owed: the drain goes on waiting
        t = time.monotonic()
        out = _ckptd("abandon", "--socket", d.socket, "ab")  # every owed one of the run
        assert out.returncode == 0 and "ab@step-00000002" in out.stdout, out.stderr
        assert waiting.wait(30) == 0  # nothing left to wait for
        assert time.monotonic() - t < 30
    finally:
        waiting.kill()
        waiting.wait()
    marker = os.path.join(d.root, ".ckptd", "abandoned", "ab", "step-00000001.json")
    with open(marker) as f:
        assert json.load(f)["store"] == store
    assert "abandoned on purpose" in d.log_text()
    # A restarted daemon does not owe them again; the local copies stay.
    d.kill()
    d.start()
    out = _ckptd("drain", "--timeout", "30", "--socket", d.socket)
    assert out.returncode == 0, out.stderr
    assert _committed(d.root, "ab", "step-00000001") and _committed(d.root, "ab", "step-00000002")
    # With no daemon running, abandon works on the root alone.
    with Checkpointer("ab", socket=d.socket) as ckpt:
        ckpt.save(3, model=Net()).wait("committed", timeout=60)
    d.kill()
    out = _ckptd("abandon", "--socket", d.socket, "--root", d.root, "ab@step-00000003")
    assert out.returncode == 0 and "ab@step-00000003" in out.stdout, out.stderr
    d.start()
    assert _ckptd("drain", "--timeout", "30", "--socket", d.socket).returncode == 0
    out = _ckptd("abandon", "--socket", d.socket, "ab@step-00000003")
    assert out.returncode == 1 and "no upload of ab@step-00000003 is owed" in out.stderr


def test_abandon_checks_names_and_is_in_help() -> None:
    out = _ckptd("abandon", "--help")
    assert out.returncode == 0 and "local copy stays" in out.stdout
    out = _ckptd("abandon", "--socket", "/nonexistent.sock", "--root", "/tmp", "../etc@x")
    assert out.returncode == 2
