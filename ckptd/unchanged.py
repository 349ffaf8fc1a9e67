"""What the client knows about its files' bytes between saves: the proof behind staging skip.

A tensor whose storage (``data_ptr``) and version counter (``_version``) are what they were when
it was last staged holds the bytes it held then, for every write that goes through PyTorch:
in-place ops, ``optimizer.step``, ``load_state_dict`` and ``copy_`` under ``no_grad`` all bump
the counter. A file all of whose tensors are unchanged, with the same header, is the same file.
With ``skip_unchanged=True`` that is used two ways (without it nothing is tracked: a snapshot
costs about a microsecond a tensor per save, and frozen parameters are marked by the plan):

- the file is marked for the daemon to hash and look up among the run's blobs, so it is linked,
  not written or uploaded, when the bytes are stored already. The hash decides; the mark only
  says where hashing is worth it.
- such a file whose blob the daemon confirmed (``committed`` names it) is not even copied into
  shared memory; the save names the blob instead.

The proof is not exact for writes that bypass the version counter: through ``tensor.data``
(a new counter), through a NumPy array or DLPack capsule sharing the memory, or by a custom
kernel writing an input in place without telling autograd. Staging skip is therefore opt-in;
dedup itself never trusts the mark (the daemon hashes the staged bytes).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import torch

from .fmt import FilePlan, SavePlan

_VERSION = attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr


@dataclass(frozen=True, slots=True)
class Snapshot:
    header: bytes
    ptrs: list[int]
    versions: list[int]


def snapshot(f: FilePlan) -> Snapshot:
    return Snapshot(f.header, list(map(_DATA_PTR, f.srcs)), list(map(_VERSION, f.srcs)))


class Unchanged:
    """Per file name: its snapshot at the last committed save, and the blob holding it."""

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self._seen: dict[str, tuple[Snapshot, str | None]] = {}
        self._pending: dict[int, dict[str, Snapshot]] = {}
        self._lock = threading.Lock()

    def mark(self, plan: SavePlan) -> dict[str, Snapshot]:
        """Set ``dedup`` and ``reuse`` of the plan's files; returns their snapshots."""
        snaps: dict[str, Snapshot] = {}
        with self._lock:
            seen = dict(self._seen)
        for f in plan.files:
            f.reuse = None
            snap = snapshot(f)
            snaps[f.name] = snap
            prev = seen.get(f.name)
            unchanged = prev is not None and prev[0] == snap
            if unchanged:
                f.dedup = True
                if self.skip and prev is not None and prev[1] is not None:
                    f.reuse = prev[1]
            elif not f.name.endswith(".frozen.safetensors"):
                f.dedup = False
        return snaps

    def staged(self, sid: int, snaps: dict[str, Snapshot]) -> None:
        with self._lock:
            self._pending[sid] = snaps

    def committed(self, sid: int, blobs: dict[str, Any] | None) -> None:
        with self._lock:
            snaps = self._pending.pop(sid, None)
            if snaps is None:
                return
            for name, snap in snaps.items():
                digest = (blobs or {}).get(name)
                self._seen[name] = (snap, digest if isinstance(digest, str) else None)

    def failed(self, sid: int) -> None:
        """A save that did not commit: trust nothing seen so far (the next save stages all)."""
        with self._lock:
            self._pending.pop(sid, None)
            self._seen.clear()


class StableKeys:
    """For models given as plain state dicts (Lightning hands ckptd ``state_dict()``, whose
    tensors say nothing of ``requires_grad``): the keys whose tensors kept their storage and
    version counter since the previous save. A detached tensor shares its parameter's counter,
    so a frozen base shows up as stable from the second save on and is stored apart (and once)
    from then; a tensor that changes again simply moves back. Costs ~1 us a tensor per save,
    for dict models only. The hash still decides what is stored."""

    def __init__(self) -> None:
        self._last: dict[str, dict[str, tuple[int, int]]] = {}

    def update(self, models: dict[str, Any]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for name, sd in models.items():
            if not isinstance(sd, dict):
                continue
            keys = [k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.numel()]
            values = [sd[k] for k in keys]
            marks = zip(map(_DATA_PTR, values), map(_VERSION, values), strict=True)
            now = dict(zip(keys, marks, strict=True))
            before = self._last.get(name, {})
            out[name] = {k for k, v in now.items() if before.get(k) == v}
            self._last[name] = now
        return out
