"""What the ported cases run on: a ``Storage`` that hands out DCP's file-system writer and
reader or ckptd's, and the world of ranks that runs a module's multi-process cases."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch.distributed.checkpoint as dcp

import ckptd.dcp

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKENDS = ("fs", "ckptd")
WORLD_BACKENDS = (*BACKENDS, "ckptd-s3")  # the world runs also go through S3 (moto)
WORLD_TIMEOUT_S = 240
SEED = 1234  # upstream's TestCase seeds every case (and every rank) the same


@dataclasses.dataclass
class Storage:
    """One storage for a case. ``name`` is what upstream gives as a directory: a path under
    ``base`` for the file system, a tag of ``run`` for ckptd (which never overwrites a tag, so
    a case that saves again over one directory gets a fresh name from ``fresh``)."""

    kind: str
    base: str  # fs: the directory the checkpoints go under; ckptd: unused
    socket: str = ""  # ckptd: the daemon socket
    run: str = "upstream"
    _count: int = 0
    _writer: Any = None

    @property
    def is_ckptd(self) -> bool:
        return self.kind.startswith("ckptd")

    def fresh(self, label: str) -> str:
        self._count += 1
        return re.sub(r"[^A-Za-z0-9._=+-]", "-", f"{label}-{self._count}")

    def path(self, name: str) -> str:
        return os.path.join(self.base, name)

    def writer(self, name: str, **fs_options: Any) -> Any:
        """``fs_options`` (``thread_count``, ``_extensions``, ``overwrite``,
        ``cache_staged_state_dict``) are FileSystemWriter's own: ckptd has no such knobs."""
        if self.is_ckptd:
            # One writer for every save (its daemon connection and staging slots are reused),
            # aimed at ``name`` as a new FileSystemWriter would be at a new path.
            if self._writer is None:
                self._writer = ckptd.dcp.Writer(run=self.run, socket=self.socket)
            self._writer.tag = name
            return self._writer
        return dcp.FileSystemWriter(self.path(name), **fs_options)

    def reader(self, name: str, **fs_options: Any) -> Any:
        if self.is_ckptd:
            return ckptd.dcp.Reader(run=self.run, socket=self.socket, checkpoint_id=name)
        return dcp.FileSystemReader(self.path(name), **fs_options)

    def save(self, state: Any, name: str, fn: Callable[..., Any] = dcp.save, **kw: Any) -> Any:
        return fn(state, storage_writer=self.writer(name), **kw)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def load(self, state: Any, name: str, fn: Callable[..., Any] = dcp.load, **kw: Any) -> Any:
        return fn(state, storage_reader=self.reader(name), **kw)


def run_world(
    module: str, kind: str, world: int, tmp: str, socket: str, cases: list[str]
) -> dict[str, dict[str, Any]]:
    """Run ``cases`` of ``module`` in one world of ``world`` ranks; each case's verdict, as
    rank 0 saw it, plus every rank's error (a missing case: the world died before it)."""
    out = os.path.join(tmp, f"out-{kind}")
    os.makedirs(out, exist_ok=True)
    base = os.path.join(tmp, f"fs-{kind}")
    os.makedirs(base, exist_ok=True)
    args = {"module": module, "kind": kind, "base": base, "socket": socket, "out": out,
            "rendezvous": os.path.join(tmp, f"rdzv-{kind}"), "cases": cases}  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    logs = [open(os.path.join(out, f"rank-{r}.log"), "w") for r in range(world)]  # noqa: SIM115
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.dcp_upstream.worker",
                str(r),
                str(world),
                json.dumps(args),
            ],
            cwd=REPO,
            env=env,
            stdout=logs[r],
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    try:
        for p in procs:
            p.wait(timeout=WORLD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    verdicts: dict[str, dict[str, Any]] = {}
    for r in range(world):
        path = os.path.join(out, f"rank-{r}.jsonl")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f:
                v = json.loads(line)
                seen = verdicts.setdefault(v["case"], {"ranks": 0, "errors": []})
                seen["ranks"] += 1
                if v.get("error"):
                    seen["errors"].append(f"rank {r}: {v['error']}\n{v.get('trace', '')}")
                if v.get("skip"):
                    seen["skip"] = v["skip"]
    for v in verdicts.values():
        v["complete"] = v["ranks"] == world
    return verdicts


def check_world(v: dict[str, Any]) -> None:
    """A world case's verdict as a test outcome."""
    if v.get("skip"):
        pytest.skip(v["skip"])
    assert not v["errors"], "\n".join(v["errors"])


def tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""
