"""What the benchmark starts and watches: work dirs, the daemon, S3/GCS servers, memory sampling.

Everything started here is owned by one ``Infra`` (an ``ExitStack``) and torn down in reverse order
on exit, error or Ctrl-C: child processes by their own pid (each in its own session), temp dirs
removed. The servers are the tests' own, from ``ckptd.testing.servers``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import torch

from ckptd.spawn import DaemonProcess
from ckptd.testing.servers import Server, start_fake_gcs, start_moto

# ---- memory ---------------------------------------------------------------------------------

_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """Memory fields of /proc/<pid>/status in bytes (empty if the process is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in _FIELDS:
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def meminfo_shmem() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


class MemSampler:
    """Samples the trainer's and the daemon's memory every ``interval`` s in a thread.

    ``phase()`` returns, for its duration: the trainer's peak RSS above its RSS at the start, the
    daemon's peak private RSS (VmRSS - RssShmem: what it holds beyond the shared slots it maps),
    its peak RssShmem, and the peak rise of the system's Shmem (memfd slots, /dev/shm).
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.daemon_pid: int | None = None
        self._peaks: dict[str, int] | None = None
        self._base: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-mem", daemon=True)
        self._thread.start()

    def _sample(self) -> dict[str, int]:
        me = proc_status()
        out = {"trainer_rss": me.get("VmRSS", 0), "shmem": meminfo_shmem()}
        if self.daemon_pid is not None:
            d = proc_status(self.daemon_pid)
            if d:
                out["daemon_private"] = d["VmRSS"] - d.get("RssShmem", 0)
                out["daemon_shmem"] = d.get("RssShmem", 0)
                out["daemon_rss"] = d["VmRSS"]
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            s = self._sample()
            with self._lock:
                if self._peaks is not None:
                    for k, v in s.items():
                        self._peaks[k] = max(self._peaks.get(k, v), v)

    @contextlib.contextmanager
    def phase(self) -> Iterator[dict[str, int]]:
        result: dict[str, int] = {}
        base = self._sample()
        with self._lock:
            self._peaks = dict(base)
        try:
            yield result
        finally:
            end = self._sample()
            with self._lock:
                peaks, self._peaks = self._peaks or {}, None
            for k, v in end.items():
                peaks[k] = max(peaks.get(k, v), v)
            result["trainer_rss_rise"] = peaks["trainer_rss"] - base["trainer_rss"]
            result["shmem_rise"] = peaks["shmem"] - base["shmem"]
            for k in ("daemon_private", "daemon_shmem", "daemon_rss"):
                if k in peaks:
                    result[k] = peaks[k]
            if self.daemon_pid is not None:
                result["daemon_vmhwm"] = proc_status(self.daemon_pid).get("VmHWM", 0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


# ---- the whole set ---------------------------------------------------------------------------


class Infra(contextlib.ExitStack):
    """Work directory, daemons and servers of one benchmark run; all cleaned up on exit."""

    def __init__(self, base_dir: str | None, keep: bool = False) -> None:
        super().__init__()
        if base_dir:
            os.makedirs(base_dir, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix="ckptd-bench-", dir=base_dir or None)
        # AF_UNIX paths must stay under 108 bytes: sockets live in a short dir of their own.
        self.sock_dir = tempfile.mkdtemp(prefix="ckb-", dir="/tmp")
        if not keep:
            self.callback(shutil.rmtree, self.dir, True)
        self.callback(shutil.rmtree, self.sock_dir, True)
        self.mem = MemSampler()
        self.callback(self.mem.close)
        self._moto: Server | None = None
        self._gcs: Server | None = None

    def path(self, *parts: str) -> str:
        p = os.path.join(self.dir, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def daemon(self, name: str, store: str | None = None, env: dict[str, str] | None = None) -> Any:
        """A fresh ``ckptd serve`` child with its own root; killed on exit if still running."""
        root = self.path(f"root-{name}", "")
        sock = os.path.join(self.sock_dir, f"{name}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        d = DaemonProcess(
            root, sock, store=store, log_path=self.path(f"daemon-{name}.log"), env=env
        )
        self.callback(d.kill)
        return d

    def moto(self) -> Server:
        if self._moto is None:
            self._moto = self.enter_context(start_moto(self.dir))
        return self._moto

    def fake_gcs(self) -> Server:
        if self._gcs is None:
            self._gcs = self.enter_context(start_fake_gcs(self.dir))
        return self._gcs


def settle(device: torch.device | None = None) -> None:
    """Start a measurement from a quiet machine: device idle, dirty pages on disk."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    os.sync()


__all__ = [
    "Infra",
    "MemSampler",
    "meminfo_shmem",
    "proc_status",
    "settle",
]
