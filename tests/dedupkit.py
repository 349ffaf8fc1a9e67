"""Shared pieces of the incremental-checkpoint tests (``tests/test_dedup*.py``).

Models with a frozen part (a PEFT-style base with small trainable adapters), and views of what a
real daemon left behind: the objects in the moto bucket (read with boto3 straight from the
server, never through a fault proxy) and the files and inodes in the daemon's root.

The layout under test (docs/dedup.md, issue 15): a model with frozen parameters is saved as
``<model>.weights.safetensors`` + ``<model>.frozen.safetensors``; a manifest record with
``"blob": "<blake3 hex>"`` lives at ``<run>/shared/<hex><ext>``, and in the root also as a hard
link under its listed name in the tag directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import blake3
import boto3
import torch
from botocore.exceptions import BotoCoreError, ClientError
from torch import nn

from ckptd.cli import main as cli
from tests.faultproxy import FaultProxy

__all__ = [
    "FROZEN",
    "WEIGHTS",
    "HoldProxy",
    "Peft",
    "S3View",
    "StoreWatch",
    "back_to_a_base",
    "blob_file",
    "blobs_of",
    "cli_quiet",
    "digest",
    "drain",
    "hold_proxy",
    "local_manifests",
    "local_shared",
    "peft",
    "state_of",
    "tag",
    "train",
    "watching",
]

WEIGHTS = "model.weights.safetensors"
FROZEN = "model.frozen.safetensors"


def tag(step: int) -> str:
    return f"step-{step:08d}"


# ---- models ----------------------------------------------------------------------------------


class Lora(nn.Module):
    """A low-rank adapter: ``x @ A.T @ B.T``, B zero at start as in LoRA."""

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, width) * 0.01)
        self.B = nn.Parameter(torch.zeros(width, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.A.t() @ self.B.t()


class Peft(nn.Module):
    """A frozen base (about 1.8 MB of fp32 at width 384: three linears, a norm, a frozen
    bf16 embedding-like table) with trainable LoRA adapters, a trainable head and a buffer."""

    def __init__(self, width: int = 384, rank: int = 4, out: int = 8) -> None:
        super().__init__()
        self.base = nn.ModuleList(nn.Linear(width, width) for _ in range(3))
        self.norm = nn.LayerNorm(width)
        self.table = nn.Parameter(torch.randn(16, width, dtype=torch.bfloat16))
        self.register_buffer("scale", torch.tensor(0.5))
        for p in [*self.base.parameters(), *self.norm.parameters(), self.table]:
            p.requires_grad_(False)
        self.adapters = nn.ModuleList(Lora(width, rank) for _ in range(3))
        self.head = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.table.float().mean(0)
        for lin, ad in zip(self.base, self.adapters, strict=True):
            h = torch.nn.functional.gelu(lin(h) + self.scale * ad(h))
        return self.head(self.norm(h))

    def frozen(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if not p.requires_grad}


def peft(seed: int = 0, lr: float = 1e-2) -> tuple[Peft, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = Peft()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)


def train(model: nn.Module, opt: torch.optim.Optimizer, n: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    width = model.base[0].in_features if isinstance(model, Peft) else 0
    losses = []
    for _ in range(n):
        x = torch.randn(4, width, generator=gen)
        y = torch.randint(0, 8, (4,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def state_of(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Deep copies of what a save should capture now (the live tensors go on changing)."""
    import copy

    out: dict[str, Any] = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    if opt is not None:
        out["optimizer"] = copy.deepcopy(opt.state_dict())
    return out


# ---- blobs -----------------------------------------------------------------------------------


def blob_file(name: str, rec: dict[str, Any]) -> str:
    """``<hex><ext>`` of a blob record (ext: the listed name's last suffix)."""
    return f"{rec['blob']}{os.path.splitext(name)[1]}"


def blobs_of(manifests: Any) -> set[str]:
    """Every blob file the manifests list."""
    ms = manifests.values() if isinstance(manifests, dict) else manifests
    return {blob_file(n, r) for m in ms for n, r in m["files"].items() if r.get("blob")}


def digest(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


# ---- the daemon's root -------------------------------------------------------------------------


def local_manifests(root: str, run: str) -> dict[str, dict[str, Any]]:
    ck = os.path.join(root, run, "checkpoints")
    out = {}
    for t in sorted(os.listdir(ck)) if os.path.isdir(ck) else []:
        path = os.path.join(ck, t, "MANIFEST.json")
        with contextlib.suppress(FileNotFoundError, NotADirectoryError), open(path) as f:
            out[t] = json.load(f)
    return out


def local_shared(root: str, run: str) -> dict[str, os.stat_result]:
    d = os.path.join(root, run, "shared")
    out = {}
    for name in os.listdir(d) if os.path.isdir(d) else []:
        if name.startswith("."):  # a temporary being written
            continue
        with contextlib.suppress(FileNotFoundError):
            out[name] = os.stat(os.path.join(d, name))
    return out


# ---- the bucket --------------------------------------------------------------------------------


class S3View:
    """The objects of one run in the moto bucket, read straight from the server."""

    def __init__(self, endpoint: str, bucket: str, prefix: str, run: str) -> None:
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint)
        self.bucket = bucket
        self.base = f"{prefix}/{run}/" if prefix else f"{run}/"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.base.rstrip('/')}"

    def objects(self, sub: str = "") -> dict[str, int]:
        """Key below the run -> size."""
        out: dict[str, int] = {}
        pages = self.client.get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=self.bucket, Prefix=self.base + sub):
            for o in page.get("Contents", []):
                out[o["Key"][len(self.base) :]] = int(o["Size"])
        return out

    def shared(self) -> dict[str, int]:
        """Blob file name -> size, in ``<run>/shared/``."""
        return {k.split("/", 1)[1]: n for k, n in self.objects("shared/").items()}

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.base + key)["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.base + key, Body=data)

    def manifests(self) -> dict[str, dict[str, Any]]:
        out = {}
        for key in self.objects("checkpoints/"):
            parts = key.split("/")
            if len(parts) == 3 and parts[2] == "MANIFEST.json":
                with contextlib.suppress(self.client.exceptions.NoSuchKey):
                    out[parts[1]] = json.loads(self.get(key))
        return out

    def dangling(self) -> dict[str, list[str]]:
        """Per manifest that existed all along one snapshot, the blobs it lists that are not in
        ``shared/`` (or not at their listed size). Manifests are read before and after the
        listing of ``shared/``, so a checkpoint that retention deleted meanwhile (and its blob
        after it) is not taken for a dangling reference."""
        before = self.manifests()
        shared = self.shared()
        after = set(self.manifests())
        out = {}
        for t, m in before.items():
            if t not in after:
                continue
            bad = [
                f"{n} -> {blob_file(n, r)}"
                for n, r in m["files"].items()
                if r.get("blob") and shared.get(blob_file(n, r)) != int(r["size"])
            ]
            if bad:
                out[t] = bad
        return out


class StoreWatch:
    """Checks, over and over in a thread while a scenario runs, that no manifest in the store
    lists a blob the store does not hold. ``stop()`` returns (snapshots checked, violations)."""

    def __init__(self, view: S3View) -> None:
        self.view = view
        self.checks = 0
        self.violations: list[dict[str, list[str]]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                bad = self.view.dangling()
            except (BotoCoreError, ClientError, ValueError) as e:  # a read racing a delete
                self.errors.append(repr(e))
                self._stop.wait(0.02)
                continue
            self.checks += 1
            if bad:
                self.violations.append(bad)
            self._stop.wait(0.02)  # pace the polling; not a synchronization

    def stop(self) -> tuple[int, list[dict[str, list[str]]]]:
        self._stop.set()
        self._thread.join(30)
        return self.checks, self.violations


@contextlib.contextmanager
def watching(view: S3View) -> Iterator[StoreWatch]:
    w = StoreWatch(view)
    try:
        yield w
    finally:
        w.stop()


class HoldProxy(FaultProxy):
    """A fault proxy that can also hold one request (``hold(method, match)``: the proxy stops
    forwarding until ``release()``) and refuse writes matching ``refuse_writes`` with a 500:
    what puts a save exactly between two of its requests."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self._hold: tuple[str, str] | None = None
        self.held = threading.Event()
        self._release = threading.Event()
        self.refuse_writes: str | None = None

    def hold(self, method: str, match: str) -> None:
        self._hold = (method, match)

    def release(self) -> None:
        self._release.set()

    def _rated(self, line: str) -> int | None:
        hold = self._hold
        if hold is not None and line.startswith(hold[0] + " ") and hold[1] in line:
            self._hold = None
            self.held.set()
            self._release.wait(60)  # blocks the proxy's loop: nothing else moves meanwhile
        match = self.refuse_writes
        if match is not None and line.startswith("PUT ") and match in line:
            self.injected["refused_write"] += 1
            return 500
        return super()._rated(line)


@contextlib.contextmanager
def hold_proxy(server: str, monkeypatch: Any) -> Iterator[HoldProxy]:
    """A ``HoldProxy`` in front of ``server``; ``AWS_ENDPOINT_URL`` points at it."""
    parsed = urlparse(server)
    with HoldProxy(parsed.hostname or "127.0.0.1", int(parsed.port or 80)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        try:
            yield proxy
        finally:
            proxy.release()  # a test that failed while a request was held must not hang
            monkeypatch.setenv("AWS_ENDPOINT_URL", server)


def back_to_a_base(
    view: S3View, proxy: HoldProxy, d: Any, ckpt: Any, run: str
) -> tuple[str, Any, dict[str, Any]]:
    """Steps 1 (base A) and 2 (base B) uploaded; step 3 (base A again, exactly) committed and
    its upload held at its manifest's PUT, after the daemon found A in the store.
    Returns (A's digest, step 3's handle, step 3's state)."""
    model, opt = peft(0)
    w = model.base[0].weight
    ckpt.save(1, model=model, optimizer=opt).wait("uploaded", 60)
    with torch.no_grad():
        w.mul_(2)
    train(model, opt, 1, seed=2)
    ckpt.save(2, model=model, optimizer=opt).wait("uploaded", 60)
    with torch.no_grad():
        w.mul_(0.5)  # exactly A's bytes again
    train(model, opt, 1, seed=3)
    a = view.manifests()[tag(1)]["files"][FROZEN]["blob"]
    proxy.hold("PUT", f"{tag(3)}/MANIFEST.json")
    n0 = len(proxy.calls)
    h = ckpt.save(3, model=model, optimizer=opt)
    expect = state_of(model, opt)
    h.wait("committed", 60)
    assert proxy.held.wait(60), "step 3's manifest upload never came"
    assert local_manifests(d.root, run)[tag(3)]["files"][FROZEN]["blob"] == a
    assert f"{a}.safetensors" in view.shared()
    writes = [c for c in proxy.calls[n0:] if c.op == "PutObject" and "/shared/" in c.path]
    assert not writes, writes  # the daemon found A in the store: not uploaded again
    return a, h, expect


# ---- the daemon ---------------------------------------------------------------------------------


def drain(ckpt: Any, timeout: float = 120) -> None:
    """Wait until the daemon has nothing pending (every upload done)."""
    reply = ckpt._conn.request({"op": "drain", "timeout": timeout}, timeout=timeout + 30)
    assert reply["ok"], reply


def cli_quiet(args: list[str]) -> int:
    """``ckptd <args>`` in-process; its exit code."""
    return cli(args)
