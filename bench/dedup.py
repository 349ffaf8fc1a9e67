"""The incremental-checkpoint section of ``python -m bench`` (issue 15): dedup against today's saves.

Every case trains for real (forward, backward, ``AdamW.step``) a few steps between saves, and every
save goes through a real daemon to the S3 store on moto_server (loopback). Contenders, side by side
on the same live state (the order rotates per repeat):

* ``Checkpointer(dedup=False)``: today's full save (every byte staged, written and uploaded);
* ``Checkpointer()`` (dedup on, the default): frozen parameters in their own file, stored once per
  run as a content-addressed blob;
* ``Checkpointer(skip_unchanged=True)``: also skips staging files whose tensors did not move.

Cases:

* **LoRA-like**: a frozen base (a stack of ``nn.Linear``, ``requires_grad=False``), LoRA adapters
  with ~1% of the base's parameters, AdamW over the adapters only. Per checkpoint after the first:
  bytes uploaded (objects that appeared under the run in the bucket since the save before, by key,
  ETag and LastModified) and bytes written locally (files that appeared under the run in the
  daemon's root, a hard-linked file once, by inode), against the bytes that changed: trainable
  weights + their optimizer state + the extras' tensors. Then save -> uploaded and the loop's
  blocking time (inside ``save()``) of each contender.
* **full training**: every parameter trainable (nothing can be deduplicated): blocking, save ->
  committed and upload throughput, dedup on against ``dedup=False``.
* **retention**: 20 LoRA checkpoints through a daemon with ``--keep-last 3``; the store's size at
  the end against 3 x the trainable part + 1 base.

The newest checkpoint of each dedup run is loaded back from the store (``ckptd.load``, no daemon
to take a local copy from) and compared bit for bit with the live state.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import ckptd
from ckptd.compare import bitwise_equal
from ckptd.errors import CkptdError
from ckptd.spawn import DaemonProcess
from ckptd.testing.servers import S3_ENV, bucket_name

from .infra import Infra, settle
from .report import Case, Results
from .runners import _wait_slots_grown

now = time.perf_counter

OFF = "dedup=False (today's full save)"
ON = "dedup (default)"
SKIP = "dedup + skip_unchanged=True"
MODES: dict[str, dict[str, bool]] = {
    OFF: {"dedup": False},
    ON: {},
    SKIP: {"skip_unchanged": True},
}
SLUG = {OFF: "off", ON: "dedup", SKIP: "skip"}

CHANGED = "changed part per checkpoint (denominator of the byte goals)"
DENOM = "trainable weights + optimizer state + extras"
UP = "bytes uploaded per checkpoint after the first (new objects under the run)"
WRITTEN = "bytes written locally per checkpoint after the first (new inodes under the run)"
IO = "daemon write_bytes per checkpoint after the first (/proc/<pid>/io)"
E2E = "save -> uploaded"
BLOCK = "loop blocking per save (inside save())"
COMMIT = "save -> committed"
THROUGHPUT = "upload throughput (committed -> uploaded)"
STORE = "store after 20 checkpoints, daemon --keep-last 3"

STEPS_LORA = 3  # training steps between two saves
STEPS_FULL = 2
FULL_MIN_REPEATS = 20  # pairs: 10 left the upload ratio of two medians at 0.96..1.09 run to run
RETAIN_SAVES = 20
KEEP_LAST = 3
WAIT_S = 1800.0
MB = 1e6


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- models --------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(x))``: a frozen ``nn.Linear`` and a rank-``r`` adapter."""

    def __init__(self, d: int, r: int) -> None:
        super().__init__()
        self.base = nn.Linear(d, d)
        self.lora_A = nn.Parameter(torch.empty(r, d))
        self.lora_B = nn.Parameter(torch.empty(d, r))
        self.scale = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale


class Stack(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _width(size_gb: float) -> int:
    return 2048 if size_gb >= 0.2 else 1024


@dataclass
class Model:
    """A model, its AdamW and a training step; what a loop hands ``save()``."""

    name: str
    shape: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    d: int
    batch: int = 8
    step: int = 0
    device: str = "cpu"

    def train(self, steps: int) -> None:
        for _ in range(steps):
            self.step += 1
            x = torch.randn(self.batch, self.d).to(self.device)  # the global RNG: extras change
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.model(x).pow(2).mean()
            loss.backward()
            self.optimizer.step()

    def extra(self) -> dict[str, Any]:
        return {"step": self.step, "rng": torch.get_rng_state()}

    def frozen_bytes(self) -> int:
        return sum(_nb(p) for p in self.model.parameters() if not p.requires_grad)

    def changed_bytes(self) -> int:
        """Tensor bytes of what changes between two saves: trainable weights, buffers, the
        optimizer state and the extras."""
        n = sum(_nb(p) for p in self.model.parameters() if p.requires_grad)
        n += sum(_nb(b) for b in self.model.buffers())
        for st in self.optimizer.state.values():
            n += sum(_nb(v) for v in st.values() if isinstance(v, torch.Tensor))
        return n + sum(_nb(v) for v in self.extra().values() if isinstance(v, torch.Tensor))

    def state_bytes(self) -> int:
        return self.frozen_bytes() + self.changed_bytes()


def _nb(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _init_uniform(t: torch.Tensor, bound: float, gen: torch.Generator) -> None:
    with torch.no_grad():
        t.uniform_(-bound, bound, generator=gen)


def lora_model(size_gb: float, seed: int = 0, device: str = "cpu") -> Model:
    """A frozen base of ~``size_gb`` GB (fp32 ``Linear(d, d)`` layers) with rank-d/200 adapters
    (~1% of the base's parameters); AdamW over the adapters only."""
    d = _width(size_gb)
    r = max(1, round(d / 200))
    depth = max(1, round(size_gb * 1e9 / (4 * (d * d + d))))
    with torch.device("meta"):
        model = Stack([LoRALinear(d, r) for _ in range(depth)])
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        assert isinstance(layer, LoRALinear)
        _init_uniform(layer.base.weight, (3 / d) ** 0.5, gen)  # variance 1/d: stable depth
        _init_uniform(layer.base.bias, 1 / d**0.5, gen)
        _init_uniform(layer.lora_A, 1 / d**0.5, gen)
        with torch.no_grad():
            layer.lora_B.zero_()  # LoRA's start: the adapter adds nothing yet
        layer.base.requires_grad_(False)
    model.to(device)  # initialised on the CPU (its generator), then where it trains
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    n_base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    n_train = sum(p.numel() for p in trainable)
    shape = (
        f"{depth} x LoRA(Linear({d}, {d}) frozen, r={r}); {n_train / n_base:.2%} trainable, "
        f"AdamW on the adapters"
    )
    return Model(f"lora-{size_gb:g}GB", shape, model, opt, d, device=device)


def full_model(size_gb: float, seed: int = 0, device: str = "cpu") -> Model:
    """Every parameter trainable: weights + AdamW moments come to ~``size_gb`` GB."""
    d = 1024
    depth = max(1, round(size_gb * 1e9 / 3 / (4 * (d * d + d))))
    with torch.device("meta"):
        model = Stack([nn.Linear(d, d) for _ in range(depth)])
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        assert isinstance(layer, nn.Linear)
        _init_uniform(layer.weight, (3 / d) ** 0.5, gen)
        _init_uniform(layer.bias, 1 / d**0.5, gen)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    shape = f"{depth} x Linear({d}, {d}), all trainable, AdamW"
    return Model(f"full-{size_gb:g}GB", shape, model, opt, d, device=device)


def free_model(m: Model) -> None:
    m.optimizer.state.clear()
    for p in m.model.parameters():
        p.data = torch.empty(0, dtype=p.dtype)
        p.grad = None


# ---- what a save left behind ----------------------------------------------------------------


class Bucket:
    """boto3 on the bench's bucket: the objects under a prefix, to tell what a save added."""

    def __init__(self, name: str) -> None:
        import boto3

        self.name = name
        self.client = boto3.client("s3")
        self.client.create_bucket(Bucket=name)

    def objects(self, prefix: str) -> dict[str, tuple[int, str, str]]:
        """key -> (size, ETag, LastModified): a rewritten key counts as new."""
        out: dict[str, tuple[int, str, str]] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.name, Prefix=prefix.rstrip("/") + "/"
        )
        for page in pages:
            for o in page.get("Contents", []):
                out[o["Key"]] = (int(o["Size"]), str(o["ETag"]), str(o["LastModified"]))
        return out

    def get_json(self, key: str) -> dict[str, Any]:
        import json

        body = self.client.get_object(Bucket=self.name, Key=key)["Body"].read()
        return dict(json.loads(body))

    def prune(self, prefix: str, keep_tag: str) -> None:
        """Delete the run's checkpoints older than ``keep_tag`` (never ``shared/``), outside the
        timed part: moto keeps every object on its disk, and a bucket that grows by 0.5 GB a
        save would slow the later saves of a case more than the earlier ones."""
        old = [
            {"Key": k}
            for k in self.objects(f"{prefix}/checkpoints")
            if not k.startswith(f"{prefix}/checkpoints/{keep_tag}/")
        ]
        for i in range(0, len(old), 1000):
            self.client.delete_objects(Bucket=self.name, Delete={"Objects": old[i : i + 1000]})

    def clear(self) -> None:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.name, Delete={"Objects": keys})


def new_objects(before: dict[str, tuple[int, str, str]], after: dict[str, Any]) -> int:
    return sum(v[0] for k, v in after.items() if before.get(k) != v)


InodeKey = tuple[int, int, int]  # (st_dev, st_ino, st_mtime_ns): an inode reused later differs


def local_files(path: str) -> dict[InodeKey, int]:
    """Every regular file under ``path`` once per inode (hard links once): key -> size."""
    out: dict[InodeKey, int] = {}
    for d, _, names in os.walk(path):
        for n in names:
            try:
                st = os.lstat(os.path.join(d, n))
            except FileNotFoundError:
                continue  # deleted while we walked (local retention)
            if os.path.stat.S_ISREG(st.st_mode):
                out[(st.st_dev, st.st_ino, st.st_mtime_ns)] = st.st_size
    return out


def new_inodes(before: dict[InodeKey, int], after: dict[InodeKey, int]) -> int:
    return sum(size for key, size in after.items() if key not in before)


def write_bytes(pid: int) -> int:
    """Bytes the process sent to the block layer (its page cache writes), from /proc."""
    try:
        with open(f"/proc/{pid}/io") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["write_bytes"]) - int(fields.get("cancelled_write_bytes", 0))
    except (OSError, KeyError, ValueError):
        return 0


# ---- one contender ----------------------------------------------------------------------


def checkpointer(run: str, socket: str, store: str, opts: dict[str, bool]) -> ckptd.Checkpointer:
    return ckptd.Checkpointer(run, store=store, socket=socket, **opts)


@dataclass
class Contender:
    label: str
    ck: ckptd.Checkpointer
    run: str
    prefix: str  # the run's key prefix in the bucket
    local: str  # the run's directory in the daemon's root
    url: str  # the run's URL in the store
    rows: dict[str, list[float]] = field(default_factory=dict)
    first: dict[str, float] = field(default_factory=dict)
    tag: str = ""

    def add(self, key: str, value: float) -> None:
        self.rows.setdefault(key, []).append(value)


def timed_save(c: Contender, m: Model, bucket: Bucket, daemon_pid: int) -> dict[str, float]:
    """One save: blocking, -> committed, -> uploaded, and the bytes it added in both places."""
    s3_before, local_before = bucket.objects(c.prefix), local_files(c.local)
    io_before, st_before = write_bytes(daemon_pid), _daemon_counts(c.ck)
    settle()
    t0 = now()
    h = c.ck.save(m.step, model=m.model, optimizer=m.optimizer, extra=m.extra())
    t1 = now()
    h.wait("committed", timeout=WAIT_S)
    t2 = now()
    h.wait("uploaded", timeout=WAIT_S)
    t3 = now()
    c.tag = h.tag
    up = new_objects(s3_before, bucket.objects(c.prefix))
    st_after = _daemon_counts(c.ck, h.tag)
    return {
        **{f"daemon_{k}": v - st_before.get(k, 0) for k, v in st_after.items()},
        "blocking": t1 - t0,
        "committed": t2 - t0,
        "uploaded": t3 - t0,
        "upload_s": t3 - t2,
        "up_bytes": up,
        "written": new_inodes(local_before, local_files(c.local)),
        "io": write_bytes(daemon_pid) - io_before,
    }


@contextlib.contextmanager
def no_daemon_socket(infra: Infra) -> Iterator[None]:
    """``ckptd.load`` reads a store checkpoint from the node's daemon root when one answers on
    the default socket; point that at nothing, so the load reads the store."""
    old = os.environ.get("CKPTD_SOCKET")
    os.environ["CKPTD_SOCKET"] = os.path.join(infra.sock_dir, "none.sock")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CKPTD_SOCKET", None)
        else:
            os.environ["CKPTD_SOCKET"] = old


def verify(infra: Infra, url: str, tag: str, m: Model) -> bool:
    """The checkpoint ``tag`` loaded from the store, bit for bit against the live state."""
    from ckptd.reader import _to_device

    from .runners import _canon, _tensors_equal

    with no_daemon_socket(infra):
        got = ckptd.load(url, tag=tag)
    ok = bitwise_equal(got["model"], _to_device(m.model.state_dict(), "cpu"))
    osd = _to_device(m.optimizer.state_dict(), "cpu")
    ok = ok and (
        bitwise_equal(_canon(got["optimizer"]), _canon(osd))
        or _tensors_equal(got["optimizer"], osd)
    )
    extra = got.get("extra")
    ok = ok and isinstance(extra, dict) and bitwise_equal(extra.get("rng"), m.extra()["rng"])
    return bool(ok)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ---- the section ----------------------------------------------------------------------------


class DedupBench:
    def __init__(
        self,
        infra: Infra,
        size_gb: float,
        repeats: int,
        res: Results,
        full_repeats: int | None = None,
        device: str = "cpu",
    ) -> None:
        self.infra, self.size, self.repeats, self.res = infra, size_gb, repeats, res
        self.device = device
        self.full_repeats = max(repeats, FULL_MIN_REPEATS) if full_repeats is None else full_repeats
        self.bucket: Bucket | None = None
        self.meta: dict[str, Any] = {}

    def servers(self) -> Bucket:
        """moto_server (once per bench), this process's environment pointed at it before any
        daemon starts (it inherits it), and a fresh bucket."""
        moto = self.infra.moto()
        os.environ.update(S3_ENV)
        os.environ["AWS_ENDPOINT_URL"] = moto.url
        self.bucket = Bucket(bucket_name())
        return self.bucket

    @property
    def store(self) -> Bucket:
        assert self.bucket is not None, "servers() first"
        return self.bucket

    def daemon(self, name: str, args: list[str] | None = None) -> DaemonProcess:
        """``Infra.daemon`` with extra ``ckptd serve`` arguments (retention flags)."""
        if not args:
            return self.infra.daemon(name)  # type: ignore[no-any-return]
        root = self.infra.path(f"root-{name}", "")
        sock = os.path.join(self.infra.sock_dir, f"{name}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        d = DaemonProcess(root, sock, args=args, log_path=self.infra.path(f"daemon-{name}.log"))
        self.infra.callback(d.kill)
        return d

    def _first_saves(
        self, case: str, m: Model, cs: list[Contender], daemon: DaemonProcess, steps: int
    ) -> None:
        """Train, record the case, and make each contender's first (untimed) checkpoint."""
        m.train(steps)
        self.res.cases.append(
            Case(case, m.shape, m.state_bytes(), len(m.model.state_dict()), self.device)
        )
        for c in cs:
            log(f"{case}: first save, {c.label}")
            c.first = timed_save(c, m, self.store, daemon.pid)
            _wait_slots_grown(c.ck)  # a one-off after the first save; not in the figures

    def contender(self, label: str, run: str, daemon: DaemonProcess) -> Contender:
        prefix = f"{run}-store"
        store = f"s3://{self.store.name}/{prefix}"
        ck = checkpointer(run, daemon.socket, store, MODES[label])
        return Contender(
            label, ck, run, f"{prefix}/{run}", os.path.join(daemon.root, run), f"{store}/{run}"
        )

    # ---- cases 1-3: LoRA-like, three contenders side by side ---------------------------------

    def lora(self) -> str:
        m = lora_model(self.size, device=self.device)
        case = f"dedup {m.name}"
        res = self.res
        daemon = self.daemon(f"dedup-{m.name}")
        cs: list[Contender] = []
        try:
            cs = [self.contender(lab, f"lora-{SLUG[lab]}", daemon) for lab in MODES]
            self._first_saves(case, m, cs, daemon, STEPS_LORA)
            for i in range(self.repeats):
                m.train(STEPS_LORA)
                k = i % len(cs)
                log(f"{case}: repeat {i + 1} of {self.repeats}")
                for c in cs[k:] + cs[:k]:
                    r = timed_save(c, m, self.store, daemon.pid)
                    for key, v in r.items():
                        c.add(key, v)
                    if c.label == OFF:  # the dedup runs keep every checkpoint, as a user's would
                        self.store.prune(c.prefix, c.tag)
            ok = {c.label: verify(self.infra, c.url, c.tag, m) for c in cs if c.label != OFF}
            denom, frozen = m.changed_bytes(), m.frozen_bytes()
            counts = _daemon_counts(cs[0].ck)
            for c in cs:
                c.ck.close()
            daemon.stop(120)
        finally:
            for c in cs:
                c.ck.close()
            daemon.kill()
            free_model(m)
        self.meta["lora"] = {
            "frozen_bytes": frozen,
            "changed_bytes": denom,
            "steps_between_saves": STEPS_LORA,
            "daemon_totals": counts,
        }
        res.add(
            case,
            CHANGED,
            DENOM,
            denom / MB,
            "MB",
            f"tensor bytes; the frozen base is {frozen / MB:.1f} MB",
        )
        own = {UP: "daemon_bytes_uploaded", WRITTEN: "daemon_bytes_written", IO: "daemon_bytes_new"}
        for section, key in ((UP, "up_bytes"), (WRITTEN, "written"), (IO, "io")):
            for c in cs:
                note = "" if section == IO else f"first checkpoint {c.first[key] / MB:.1f} MB"
                if c.rows.get(own[section]):
                    what = own[section].removeprefix("daemon_")
                    note += f"{'; ' if note else ''}daemon's {what}: "
                    note += f"{_median(c.rows[own[section]]) / MB:.3f} MB"
                res.add(case, section, c.label, [v / MB for v in c.rows[key]], "MB", note)
        for c in cs:
            eq = ok.get(c.label)
            note = "" if eq is None else f"newest loaded from S3, bitwise equal: {eq}"
            res.add(case, E2E, c.label, c.rows["uploaded"], "s", note)
        for c in cs:
            note = f"first save {c.first['blocking'] * 1e3:.0f} ms"
            res.add(case, BLOCK, c.label, c.rows["blocking"], "s", note)
        for c in cs:
            res.add(case, COMMIT, c.label, c.rows["committed"], "s")
        res.goal(
            "dedup: bytes uploaded per ckpt / changed part",
            case,
            _ratio(res.get(case, UP, ON), denom / MB),
            "<=",
            1.05,
        )
        res.goal(
            "dedup: bytes written per ckpt / changed part",
            case,
            _ratio(res.get(case, WRITTEN, ON), denom / MB),
            "<=",
            1.05,
            "new inodes under the run; hard links once",
        )
        res.goal(
            "dedup: save -> uploaded / dedup=False",
            case,
            res.ratio(case, (E2E, ON), (E2E, OFF)),
            "<=",
            0.15,
        )
        res.goal(
            "skip_unchanged: blocking per save / dedup=False",
            case,
            res.ratio(case, (BLOCK, SKIP), (BLOCK, OFF)),
            "<=",
            0.2,
        )
        return case

    # ---- case 4: full training ------------------------------------------------------------

    def full(self) -> str:
        m = full_model(self.size, device=self.device)
        case = f"dedup {m.name}"
        res = self.res
        daemon = self.daemon(f"dedup-{m.name}")
        cs: list[Contender] = []
        # within 5% is a close comparison on a shared 2-core VM: more pairs, alternating order
        repeats = self.full_repeats
        try:
            cs = [self.contender(lab, f"full-{SLUG[lab]}", daemon) for lab in (OFF, ON)]
            self._first_saves(case, m, cs, daemon, STEPS_FULL)
            for i in range(repeats):
                m.train(STEPS_FULL)
                log(f"{case}: repeat {i + 1} of {repeats}")
                for c in cs if i % 2 == 0 else cs[::-1]:
                    r = timed_save(c, m, self.store, daemon.pid)
                    for key, v in r.items():
                        c.add(key, v)
                    c.add("throughput", r["up_bytes"] / max(r["upload_s"], 1e-9))
                    self.store.prune(c.prefix, c.tag)
            ok = verify(self.infra, cs[1].url, cs[1].tag, m)
            for c in cs:
                c.ck.close()
            daemon.stop(120)
        finally:
            for c in cs:
                c.ck.close()
            daemon.kill()
            free_model(m)
        for c in cs:
            note = f"{repeats} saves each, pairs in alternating order" if c.label == OFF else ""
            res.add(case, BLOCK, c.label, c.rows["blocking"], "s", note)
        for c in cs:
            note = f"newest loaded from S3, bitwise equal: {ok}" if c.label == ON else ""
            res.add(case, COMMIT, c.label, c.rows["committed"], "s", note)
        for c in cs:
            mb = _median(c.rows["up_bytes"]) / 1e6
            res.add(case, THROUGHPUT, c.label, c.rows["throughput"], "B/s", f"{mb:.0f} MB each")
        for c in cs:
            res.add(case, UP, c.label, [v / MB for v in c.rows["up_bytes"]], "MB")
        # Each pair is two saves of the same state back to back (order alternating), so the
        # median of the per-pair ratios cancels the load drifting on a shared machine, which
        # the ratio of two medians does not (it read 0.88..1.16 run to run with equal code).
        off, on = cs[0].rows, cs[1].rows
        for name, key, invert in (
            ("full training: blocking, dedup / dedup=False", "blocking", False),
            ("full training: save -> committed, dedup / off", "committed", False),
            ("full training: upload time/byte, dedup / off", "throughput", True),
        ):
            pairs = zip(off[key], on[key], strict=True)
            ratios = [(a / b if invert else b / a) for a, b in pairs if a > 0 and b > 0]
            res.goal(
                name,
                case,
                _median(ratios) if ratios else None,
                "<=",
                1.05,
                "median of per-pair ratios"
                + ("; off throughput / dedup throughput" if invert else ""),
            )
        return case

    # ---- case 5: retention ------------------------------------------------------------------

    def retention(self) -> str:
        m = lora_model(self.size, seed=1, device=self.device)
        case = f"dedup {m.name} keep-last {KEEP_LAST}"
        res = self.res
        daemon = self.daemon(f"retain-{m.name}", ["--keep-last", str(KEEP_LAST)])
        bucket = self.store
        c: Contender | None = None
        try:
            c = self.contender(ON, "lora-retain", daemon)
            log(f"{case}: {RETAIN_SAVES} saves, {STEPS_LORA} training steps apart")
            t0 = now()
            for _ in range(RETAIN_SAVES):
                m.train(STEPS_LORA)
                h = c.ck.save(m.step, model=m.model, optimizer=m.optimizer, extra=m.extra())
                c.tag = h.tag
            c.ck.flush("uploaded", timeout=WAIT_S)
            took = now() - t0
            settled = _wait_for(lambda: _retained(bucket, c.prefix), 120)
            objects = bucket.objects(c.prefix)
            ok = verify(self.infra, c.url, c.tag, m)
            denom = KEEP_LAST * m.changed_bytes() + m.frozen_bytes()
            res.cases.append(
                Case(case, m.shape, m.state_bytes(), len(m.model.state_dict()), self.device)
            )
            c.ck.close()
            daemon.stop(120)
        finally:
            if c is not None:
                c.ck.close()
            daemon.kill()
            free_model(m)
        manifests = [k for k in objects if k.endswith("/MANIFEST.json")]
        blobs = [k for k in objects if "/shared/" in k]
        total = sum(v[0] for v in objects.values())
        res.add(
            case,
            STORE,
            "sum of object sizes under the run",
            total / MB,
            "MB",
            f"{len(manifests)} checkpoints, {len(blobs)} blobs, {len(objects)} objects; "
            f"20 saves + upload in {took:.1f} s; newest loaded from S3, bitwise equal: {ok}"
            + ("" if settled else "; retention had NOT settled after 120 s"),
        )
        res.add(case, STORE, f"{KEEP_LAST} x changed part + 1 frozen base", denom / MB, "MB")
        res.goal(
            f"keep-last {KEEP_LAST} of 20: store / (3 x changed + base)",
            case,
            _ratio(total, denom),
            "<=",
            1.1,
        )
        self.meta["retention"] = {
            "checkpoints": len(manifests),
            "blobs": len(blobs),
            "objects": len(objects),
            "settled": settled,
        }
        return case


def _retained(bucket: Bucket, prefix: str) -> bool:
    """Retention has caught up: at most KEEP_LAST manifests, and every blob one of them lists."""
    from botocore.exceptions import ClientError

    from ckptd.blobs import blob_files

    objs = bucket.objects(prefix)
    manifests = [k for k in objs if k.endswith("/MANIFEST.json")]
    if len(manifests) > KEEP_LAST:
        return False
    try:
        listed = blob_files(bucket.get_json(k) for k in manifests)
    except ClientError:  # a manifest deleted between the listing and the read
        return False
    blobs = {k.rsplit("/", 1)[1] for k in objs if f"{prefix}/shared/" in k}
    return blobs <= set(listed)


def _wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    """Poll the store (the daemon's retention runs on its own) until ``pred``; False on timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)  # polling a store, not synchronization between our own threads
        delay = min(delay * 2, 1.0)
    return True


def _ratio(x: float | None, y: float | None) -> float | None:
    return None if x is None or not y else x / y


def _daemon_counts(ck: ckptd.Checkpointer, tag: str | None = None) -> dict[str, float]:
    """The daemon's own byte counters (``ckptd status``), and the job ``tag``'s ``bytes_new``:
    cross-checks of what the bench measures from outside."""
    try:
        st = ck.status()
    except (CkptdError, OSError):  # informational only
        return {}
    out = {k: float(st.get(k) or 0) for k in ("bytes_written", "bytes_uploaded", "bytes_deduped")}
    if tag is not None:
        for job in st.get("jobs", []):
            if (
                job.get("tag") == tag
                and job.get("run") == ck.run
                and job.get("bytes_new") is not None
            ):
                out["bytes_new"] = float(job["bytes_new"])
    return out


def run_dedup(
    infra: Infra,
    size_gb: float,
    repeats: int,
    res: Results,
    full_repeats: int | None = None,
    device: str = "cpu",
) -> list[str]:
    """The whole incremental-checkpoint section; adds its cases, rows and goals to ``res``.
    ``full_repeats``: save pairs of the full-training case (default: ``repeats``, at least 20).
    ``device``: where the models train (``cuda``: the CUDA rows, staged from the GPU)."""
    b = DedupBench(infra, size_gb, repeats, res, full_repeats, device)
    bucket = b.servers()
    cases: list[str] = []
    try:
        for part in (b.lora, b.full, b.retention):
            cases.append(part())
            bucket.clear()  # moto keeps objects on its disk: start each case from an empty one
            gc_collect()
    finally:
        with contextlib.suppress(Exception):
            bucket.clear()
    res.meta["dedup"] = {
        **b.meta,
        "size_gb": size_gb,
        "device": device,
        "store": "S3 on moto_server (loopback)",
        "bytes_uploaded": "sizes of objects under the run that are new or rewritten since the "
        "save before (key, ETag, LastModified)",
        "bytes_written": "sizes of files under <root>/<run> whose inode is new since the save "
        "before (a hard-linked file once)",
    }
    return cases


def gc_collect() -> None:
    import gc

    gc.collect()


__all__ = ["run_dedup"]
