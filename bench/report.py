"""Collect figures and goals; print them as a text table or as JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class Row:
    case: str
    section: str
    contender: str
    unit: str  # "s", "B", "B/s", "x"
    values: list[float]
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")


@dataclass
class Goal:
    name: str
    case: str
    value: float | None
    op: str  # "<=" or ">="
    target: float
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "n/a"
        ok = self.value <= self.target if self.op == "<=" else self.value >= self.target
        return "pass" if ok else "MISS"


@dataclass
class Case:
    name: str
    desc: str
    nbytes: int
    ntensors: int
    device: str


@dataclass
class Results:
    meta: dict[str, Any] = field(default_factory=dict)
    cases: list[Case] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)

    def add(
        self,
        case: str,
        section: str,
        contender: str,
        values: list[float] | float,
        unit: str,
        note: str = "",
    ) -> Row:
        vals = [float(v) for v in (values if isinstance(values, list) else [values])]
        row = Row(case, section, contender, unit, vals, note)
        self.rows.append(row)
        return row

    def get(self, case: str, section: str, contender: str) -> float | None:
        for r in self.rows:
            if (r.case, r.section, r.contender) == (case, section, contender) and r.values:
                return r.median
        return None

    def ratio(
        self, case: str, a: tuple[str, str], b: tuple[str, str], invert: bool = False
    ) -> float | None:
        x, y = self.get(case, *a), self.get(case, *b)
        if x is None or y is None or y == 0:
            return None
        return y / x if invert else x / y

    def goal(
        self, name: str, case: str, value: float | None, op: str, target: float, note: str = ""
    ) -> None:
        self.goals.append(Goal(name, case, value, op, target, note))

    # ---- output --------------------------------------------------------------------------

    def to_json(self) -> str:
        doc = {
            "meta": self.meta,
            "cases": [asdict(c) for c in self.cases],
            "rows": [{**asdict(r), "median": r.median} for r in self.rows],
            "goals": [{**asdict(g), "verdict": g.verdict} for g in self.goals],
        }
        return json.dumps(doc, indent=1, default=str)

    def to_text(self) -> str:
        out: list[str] = []
        m = self.meta
        out.append(f"ckptd benchmark  {m.get('date', '')}")
        out.append(f"  command: {m.get('command', '')}")
        out.append(f"  machine: {m.get('machine', '')}")
        out.append(f"  torch {m.get('torch', '')}, python {m.get('python', '')}")
        out.append(f"  disk: {m.get('disk', '')}")
        out.append(f"  repeats: {m.get('repeats', '')} (medians; min..max in brackets)")
        if "load" in m:
            end = f", at the end {m['load_end']}" if "load_end" in m else ""
            out.append(f"  load average (1/5/15 min): at the start {m['load']}{end}")
        for c in self.cases:
            rows = [r for r in self.rows if r.case == c.name]
            if not rows:
                continue
            out.append("")
            out.append(
                f"## {c.name}: {c.desc}; {c.nbytes / 1e9:.3f} GB in {c.ntensors} tensors; {c.device}"
            )
            section = None
            for r in rows:
                if r.section != section:
                    section = r.section
                    out.append(f"  {section}")
                out.append(f"    {r.contender:<44} {_fmt_row(r)}")
        if self.goals:
            out.append("")
            out.append("## goals (ratios measured in this run)")
            for g in self.goals:
                val = "n/a" if g.value is None else f"{g.value:.3f}"
                line = f"  {g.verdict:<5} {g.name:<52} {g.case:<18} {val:>8} {g.op} {g.target:g}"
                out.append(line + (f"   ({g.note})" if g.note else ""))
        growth = self.growth_table()
        if growth:
            out.append("")
            out.extend(growth)
        return "\n".join(out)

    def growth_table(self) -> list[str]:
        """Cost against state size and against tensor count, one line per case."""
        lines = ["## growth (medians)"]
        hdr = (
            f"  {'case':<18} {'GB':>6} {'tensors':>8} {'limit ms':>9} {'ckptd ms':>9} "
            f"{'torch.save ms':>13} {'dcp ms':>8} {'commit s':>9} {'raw s':>7} "
            f"{'ckptd-limit us/tensor':>21}"
        )
        lines.append(hdr)
        any_row = False
        for c in self.cases:
            lim = self.get(c.name, "blocking per save", LIMIT)
            ck = self.get(c.name, "blocking per save", CKPTD)
            if lim is None or ck is None:
                continue
            any_row = True
            ts = self.get(c.name, "blocking per save", "torch.save")
            dc = self.get(c.name, "blocking per save", DCP_DEFAULT)
            cm = self.get(c.name, "time to durable", CKPTD_COMMIT)
            rw = self.get(c.name, "time to durable", RAW)
            lines.append(
                f"  {c.name:<18} {c.nbytes / 1e9:>6.3f} {c.ntensors:>8} {lim * 1e3:>9.1f} "
                f"{ck * 1e3:>9.1f} {_ms(ts):>13} {_ms(dc):>8} {_s(cm):>9} {_s(rw):>7} "
                f"{(ck - lim) / c.ntensors * 1e6:>21.1f}"
            )
        return lines if any_row else []


LIMIT = "limit: copy into preallocated shm"
RAW = "limit: raw sequential write + fsync"
CKPTD = "ckptd Checkpointer.save"
CKPTD_COMMIT = "ckptd save -> committed"
DCP_DEFAULT = "dcp.async_save (thread)"
DCP_STAGER = "dcp.async_save + DefaultStager"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _fmt(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v * 1e3:.1f} ms" if abs(v) < 10 else f"{v:.2f} s"
    if unit == "B":
        return f"{v / 2**20:.0f} MiB"
    if unit == "B/s":
        return f"{v / 1e6:.0f} MB/s"
    if unit == "x":
        return f"{v:.3f}"
    return f"{v:g} {unit}"


def _fmt_row(r: Row) -> str:
    if not r.values:
        return f"{'-':>12}  {r.note}"
    med = _fmt(r.median, r.unit)
    rng = ""
    if len(r.values) > 1:
        rng = f"[{_fmt(min(r.values), r.unit)}..{_fmt(max(r.values), r.unit)}]"
    note = f"  {r.note}" if r.note else ""
    return f"{med:>12} {rng:<26}{note}"


def machine_meta(args: Any, work_dir: str) -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPUs ({cpu}), {mem / 2**30:.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}" + (f", GPU {gpu}" if gpu else ", no GPU"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "disk": _disk(work_dir),
        "repeats": args.repeats,
        "gpu": gpu,
        "load": load_average(),
    }


def load_average() -> str:
    """The 1/5/15-minute load averages: above the CPU count, other work shared the machine."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _disk(path: str) -> str:
    """Filesystem and block device under ``path`` (from /proc/mounts), and its free space."""
    best = ("", "", "")
    try:
        real = os.path.realpath(path)
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fs = line.split()[:3]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                    best[1]
                ):
                    best = (dev, mnt, fs)
        st = os.statvfs(path)
        free = st.f_bavail * st.f_frsize / 1e9
    except OSError:
        return "unknown"
    rot = ""
    name = os.path.basename(best[0])
    try:
        with open(f"/sys/block/{name.rstrip('0123456789')}/queue/rotational") as f:
            rot = ", rotational" if f.read().strip() == "1" else ", non-rotational"
    except OSError:
        pass
    return f"{best[2]} on {best[0]} mounted at {best[1]}{rot}, {free:.0f} GB free"


__all__ = [
    "CKPTD",
    "CKPTD_COMMIT",
    "DCP_DEFAULT",
    "DCP_STAGER",
    "LIMIT",
    "RAW",
    "Case",
    "Results",
    "load_average",
    "machine_meta",
]
