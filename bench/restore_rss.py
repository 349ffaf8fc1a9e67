"""Peak RSS of a process that only restores: one fresh child per case.

The child imports everything, takes its RSS as the baseline and resets the kernel's high-water
mark to it (``/proc/self/clear_refs`` = 5), restores once, and prints its ``VmHWM`` - baseline.
``VmHWM`` and not ``ru_maxrss``: a child started with vfork + exec (what ``subprocess`` does)
inherits into ``ru_maxrss`` the high-water mark of the parent's memory, here a bench holding
several GB. A restore into a model counts the model: the child builds it after the baseline,
so that case's ideal is 1.0 x the state, like a ``load`` that returns the state.

Run as ``python -m bench.restore_rss '<json spec>'``; ``measure`` does that from the bench.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from typing import Any

_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _restore(spec: dict[str, Any]) -> tuple[int, int, bool]:
    """(baseline RSS, peak RSS, whether the peak was reset to the baseline) of one restore."""
    import warnings

    import torch  # before the baseline, like every other import of the restore
    import torch.distributed.checkpoint

    import ckptd
    import ckptd.dcp
    import ckptd.storage.gcs
    import ckptd.storage.s3  # the store clients load lazily; their imports are not the restore's

    from .states import build

    warnings.filterwarnings("ignore")
    kind = spec["kind"]
    base = _status("VmRSS")
    st = None
    if kind in ("Checkpointer.restore", "load_state_dict(torch.load)"):
        # What a resuming process holds before it restores: its model (counted: it is above
        # the baseline) and an optimizer that has not stepped yet (no state). Building the
        # bench state fills the optimizer, so the peak is reset after clearing it.
        st = build(spec["state"], "cpu", seed=1)
        st.optimizer.state.clear()
        gc.collect()
    reset = _reset_peak()
    if not reset:
        base = _status("VmHWM")
    if kind == "ckptd.load":
        out: Any = ckptd.load(spec["url"], tag=spec["tag"])
    elif kind == "torch.load":
        out = torch.load(spec["path"], map_location="cpu")
    elif kind == "Checkpointer.restore":
        assert st is not None
        ck = ckptd.Checkpointer(spec["run"], socket=spec["socket"])
        if ck.restore(st.model, st.optimizer, tag=spec["tag"]) is None:
            raise SystemExit("nothing restored")
        ck.close()
        out = st
    elif kind == "load_state_dict(torch.load)":
        assert st is not None
        sd = torch.load(spec["path"], map_location="cpu")
        st.model.load_state_dict(sd["model"])
        st.optimizer.load_state_dict(sd["optimizer"])
        del sd
        out = st
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    peak = _status("VmHWM")
    del out
    return base, peak, reset


def measure(spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run one restore in a fresh ``python -m bench.restore_rss`` child; its figures."""
    env = {**os.environ, "PYTHONPATH": _PKG_PARENT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run(
        [sys.executable, "-m", "bench.restore_rss", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if p.returncode != 0:
        raise RuntimeError(f"restore child {spec['kind']} failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    base, peak, reset = _restore(json.loads(sys.argv[1]))
    print(json.dumps({"baseline": base, "peak": peak, "rise": peak - base, "reset": reset}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
