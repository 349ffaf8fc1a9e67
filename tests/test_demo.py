"""``ckptd demo``: it passes end to end, and its last lines tell the truth (issue 17).

The ratio carries its direction, a busy machine is called busy, and the path printed at the end
exists, or the line says it was removed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from ckptd.demo import busy_reason, ratio_line


def test_ratio_line_says_which_way() -> None:
    assert ratio_line(0.019, 0.1) == "ckptd blocks the loop for 0.19x the time of torch.save"
    assert ratio_line(0.174, 0.1) == "ckptd blocks the loop 1.74x longer than torch.save"
    assert "longer" in ratio_line(0.1, 0.1)
    assert "longer" in ratio_line(0.1, 0.0)


def test_busy_reason() -> None:
    assert busy_reason([0.10, 0.11, 0.10], load1=0.5, ncpu=2) is None
    spread = busy_reason([0.10, 0.30, 0.11], load1=0.5, ncpu=2)
    assert spread is not None and "100 to 300 ms" in spread
    load = busy_reason([0.10], load1=7.2, ncpu=2)
    assert load == "load average 7.2 on 2 CPUs"
    both = busy_reason([0.1, 0.5], load1=3.0, ncpu=2)
    assert both is not None and "load average" in both and "torch.save" in both


def _demo(*args: str) -> str:
    p = subprocess.run(
        [sys.executable, "-m", "ckptd", "demo", "--steps", "10", "--every", "5", "--width", "64",
         *args],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


@pytest.mark.slow
def test_demo_end_to_end_removed(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    env_tmp = str(tmp_path)
    monkeypatch.setenv("TMPDIR", env_tmp)  # the demo's mkdtemp lands here, so the test can look
    out = _demo()
    lines = out.strip().splitlines()
    assert "demo OK" in lines
    assert any(re.fullmatch(r"ckptd blocks the loop (for [\d.]+x the time of|[\d.]+x longer than) torch\.save", ln) for ln in lines), out  # fmt: skip
    busy = [ln for ln in lines if ln.startswith("note: the machine looks busy")]
    assert len(busy) <= 1
    m = re.fullmatch(r"removed (\S+) and the checkpoints in it \(--keep or --dir keeps them\)", lines[-1])  # fmt: skip
    assert m, lines[-1]
    assert m.group(1).startswith(env_tmp) and not os.path.exists(m.group(1))


@pytest.mark.slow
def test_demo_end_to_end_kept(tmp_path) -> None:  # type: ignore[no-untyped-def]
    work = tmp_path / "demo"
    out = _demo("--dir", str(work))
    last = out.strip().splitlines()[-1]
    assert last == f"checkpoints in {work}/store/demo/checkpoints"
    assert any(n.startswith("step-") for n in os.listdir(work / "store" / "demo" / "checkpoints"))
