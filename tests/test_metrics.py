"""The metrics endpoint: a real daemon with ``--metrics-port``, a save through the client, and
the page scraped over loopback and parsed; the exposition itself from synthetic stats."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from ckptd import Checkpointer
from ckptd.daemon.jobs import Job, JobState, Stats
from ckptd.daemon.metrics import Histogram, Snapshot, escape_label, render
from ckptd.testing.servers import free_port

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A small parser of the text format: (name, labels) -> value; every line must parse."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert name not in types, f"family {name} declared twice"
            types[name] = kind
            continue
        if line.startswith("#") or not line:
            continue
        m = _SAMPLE.match(line)
        assert m, f"unparsable line {line!r}"
        labels: list[tuple[str, str]] = []
        if m.group(3):
            pos = 0
            for lm in _LABEL.finditer(m.group(3)):
                assert lm.start() == pos, f"bad labels in {line!r}"
                value = re.sub(
                    r"\\(.)", lambda e: {"n": "\n"}.get(e.group(1), e.group(1)), lm.group(2)
                )
                labels.append((lm.group(1), value))
                pos = lm.end()
            assert pos == len(m.group(3)), f"bad labels in {line!r}"
        key = (m.group(1), frozenset(labels))
        assert key not in out, f"sample {key} twice"
        out[key] = float(m.group(4))
    for name in {k[0] for k in out}:
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or family in types, f"{name} has no TYPE"
    return out


def value(
    page: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return page[(name, frozenset(labels.items()))]


def _scrape(url: str, accept: str | None = None) -> tuple[str, str]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.headers["Content-Type"], resp.read().decode()


def test_a_save_shows_on_the_scraped_page(make_daemon) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    d = make_daemon(args=["--metrics-port", str(port)])
    url = f"http://127.0.0.1:{port}/metrics"
    before = time.time()
    with Checkpointer("metrics/run-1", socket=d.socket) as ckpt:
        ckpt.save(1, model=torch.nn.Linear(64, 64)).wait("uploaded", timeout=60)
        ckpt.save(2, model=torch.nn.Linear(64, 64)).wait("uploaded", timeout=60)
        ctype, text = _scrape(url)
        # ckptd status asks on its own connection: it is no client (it once counted itself).
        st = subprocess.run([sys.executable, "-m", "ckptd", "status", "--json", "--socket", d.socket],
                            capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert ctype.startswith("text/plain; version=0.0.4")
    page = parse(text)
    assert value(page, "ckptd_saves_total") == 2
    assert value(page, "ckptd_failures_total") == 0
    assert value(page, "ckptd_bytes_written_total") >= 2 * 64 * 64 * 4
    assert value(page, "ckptd_clients") == 1
    assert value(page, "ckptd_upload_queue_depth") == 0
    assert value(page, "ckptd_info", version=json.loads(st.stdout)["version"]) == 1
    last = value(page, "ckptd_last_upload_timestamp_seconds", run="metrics/run-1")
    assert before <= last <= time.time()
    assert (
        0 <= value(page, "ckptd_seconds_since_newest_durable_checkpoint", run="metrics/run-1") < 60
    )
    assert value(page, "ckptd_newest_durable_step", run="metrics/run-1") == 2
    for stage in ("write", "commit"):
        assert value(page, "ckptd_stage_duration_seconds_count", stage=stage) == 2
        assert value(page, "ckptd_stage_duration_seconds_bucket", stage=stage, le="+Inf") == 2
    assert value(page, "ckptd_stage_duration_seconds_count", stage="upload") == 0  # root store
    status = json.loads(st.stdout)
    assert status["clients"] == 1 and status["connections"] == 2
    assert status["metrics"] == url and status["saves"] == 2
    # OpenMetrics when asked; anything but GET /metrics is refused.
    ctype, om = _scrape(url, "application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text") and om.endswith("# EOF\n")
    assert "# TYPE ckptd_saves counter" in om and "\nckptd_saves_total 2\n" in om
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
    assert e.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(url, data=b"x", method="POST"), timeout=10)
    assert e.value.code == 405


def test_a_port_in_use_is_a_clear_refusal(make_daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    d = make_daemon(args=["--metrics-port", str(port)])
    with Checkpointer("x", socket=d.socket):  # the first daemon is up and holds the port
        pass
    out = subprocess.run(
        [sys.executable, "-m", "ckptd", "serve", "--root", str(tmp_path / "r2"), "--socket",
         str(tmp_path / "s2"), "--metrics-port", str(port)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1 and f"cannot serve metrics on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


def test_exposition_escapes_labels_and_counts_buckets() -> None:
    stats = Stats()
    for s in (0.05, 0.1, 0.3, 7.0, 5000.0):
        stats.durations["upload"].observe(s)
    job = Job(run='we"ird\\run\nname', tag="t", step=3, store="s3://b/p", state=JobState.UPLOADED)
    job.created, job.committed_at, job.uploaded_at = 100.0, 101.0, 110.0
    stats.ended(job)
    pending = Job(run="r", tag="t", step=1, store="s3://b/p", state=JobState.UPLOADING)
    snap = Snapshot(version="0.1.0", started=0.0, stats=stats, jobs=[pending], upload_queue=3,
                    clients=2, store_retries={"s3://b/p": 5}, upload_retries={"s3://b/p": 1},
                    now=130.0)  # fmt: skip
    page = parse(render(snap))
    assert value(page, "ckptd_last_upload_timestamp_seconds", run='we"ird\\run\nname') == 110.0
    assert (
        value(page, "ckptd_seconds_since_newest_durable_checkpoint", run='we"ird\\run\nname') == 30
    )
    assert value(page, "ckptd_retries_total", store="s3://b/p", layer="request") == 5
    assert value(page, "ckptd_retries_total", store="s3://b/p", layer="upload") == 1
    assert value(page, "ckptd_jobs", phase="uploading") == 1
    assert value(page, "ckptd_upload_queue_depth") == 3
    buckets = {le: value(page, "ckptd_stage_duration_seconds_bucket", stage="upload", le=le)
               for le in ("0.1", "0.25", "0.5", "10", "3600", "+Inf")}  # fmt: skip
    assert buckets == {"0.1": 2, "0.25": 2, "0.5": 3, "10": 4, "3600": 4, "+Inf": 5}
    assert value(page, "ckptd_stage_duration_seconds_sum", stage="upload") == pytest.approx(5007.45)
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    h = Histogram((1.0,))
    h.observe(-3)  # a clock step back is no negative duration
    assert h.cumulative() == [("1", 1), ("+Inf", 1)]


def test_docs_list_every_family() -> None:
    """docs/metrics.md's table and the page name the same families."""
    snap = Snapshot(version="0", started=0.0, stats=Stats(), jobs=[], upload_queue=0, clients=0,
                    store_retries={}, upload_retries={}, now=1.0)  # fmt: skip
    families = set(re.findall(r"^# TYPE (\S+) ", render(snap), re.M))
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "metrics.md")) as f:
        documented = set(re.findall(r"^\| `(ckptd_[a-z_]+)` \|", f.read(), re.M))
    assert families == documented
