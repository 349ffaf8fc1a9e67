"""``ckptd serve --metrics-port N``: the daemon's counters on ``/metrics`` for Prometheus.

Opt-in, and on 127.0.0.1 unless ``--metrics-host`` says otherwise: the page names runs and
stores, which are the user's business. The exposition is written here by hand (text format
0.0.4, or OpenMetrics 1.0 when the scraper asks for it): ``prometheus_client`` serves from a
thread of its own and would be a dependency for a page of ~20 families. The HTTP server is a
small asyncio one on the daemon's loop: GET (or HEAD) ``/metrics`` only, one request per
connection, bounded request size, time and connections, so a scraper can never stall saves.

Nothing here counts anything: the job table's ``Stats`` does (``jobs.py``), and ``render``
only formats a ``Snapshot`` of it. Label values are escaped (run names are user input).
``docs/metrics.md`` lists every family.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from .jobs import Job, Stats

log = logging.getLogger("ckptd.daemon")

BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
"""Upper bounds (seconds) of the stage-duration buckets: a small commit takes a fraction of a
second, a multi-GiB upload over a slow link tens of minutes."""
TEXT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
MAX_REQUEST = 8192  # bytes of request line and headers
REQUEST_TIMEOUT = 5.0
MAX_CONNECTIONS = 8


class Histogram:
    """Cumulative-bucket histogram of seconds; ``observe`` is a bisect and two adds."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        value = max(0.0, value)
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == math.inf else _num(bound), running))
        return out


@dataclass(slots=True)
class Snapshot:
    """What one scrape reports, gathered by the daemon (``Daemon.metrics_snapshot``)."""

    version: str
    started: float  # wall time the daemon started
    stats: Stats
    jobs: Iterable[Job]
    upload_queue: int
    clients: int
    store_retries: dict[str, int]
    upload_retries: dict[str, int]
    preempted: bool = False
    now: float = field(default_factory=time.time)


def escape_label(value: str) -> str:
    """A label value as the text formats require: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    if isinstance(v, int) or (math.isfinite(v) and v == int(v) and abs(v) < 1e15):
        return str(int(v))
    return repr(float(v))


class _Page:
    def __init__(self, openmetrics: bool) -> None:
        self.om = openmetrics
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str) -> None:
        # OpenMetrics names a counter family without its ``_total`` sample suffix.
        fam = name[: -len("_total")] if self.om and kind == "counter" else name
        self.lines.append(f"# HELP {fam} {help_}")
        self.lines.append(f"# TYPE {fam} {kind}")

    def sample(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        if labels:
            inner = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
            name = f"{name}{{{inner}}}"
        self.lines.append(f"{name} {_num(value)}")

    def text(self) -> str:
        return "\n".join([*self.lines, "# EOF"] if self.om else self.lines) + "\n"


def render(snap: Snapshot, *, openmetrics: bool = False) -> str:
    """The page for one scrape."""
    st = snap.stats
    p = _Page(openmetrics)
    p.family("ckptd_info", "gauge", "The daemon's version (always 1).")
    p.sample("ckptd_info", 1, {"version": snap.version})
    p.family("ckptd_uptime_seconds", "gauge", "Seconds since the daemon started.")
    p.sample("ckptd_uptime_seconds", round(snap.now - snap.started, 3))
    p.family("ckptd_saves_total", "counter",
             "Checkpoints accepted (whole saves and sharded commits).")  # fmt: skip
    p.sample("ckptd_saves_total", st.saves)
    p.family("ckptd_bytes_written_total", "counter", "Bytes written to the local root.")
    p.sample("ckptd_bytes_written_total", st.bytes_written)
    p.family("ckptd_bytes_uploaded_total", "counter", "Bytes the stores confirmed.")
    p.sample("ckptd_bytes_uploaded_total", st.bytes_uploaded)
    p.family("ckptd_bytes_deduped_total", "counter",
             "Bytes of saves stored already (a shared blob), not written again.")  # fmt: skip
    p.sample("ckptd_bytes_deduped_total", st.bytes_deduped)
    p.family("ckptd_retries_total", "counter",
             "Retries by store: layer=request (one store request), layer=upload (a whole "
             "checkpoint upload queued again).")  # fmt: skip
    for store in sorted(set(snap.store_retries) | set(snap.upload_retries)):
        p.sample("ckptd_retries_total", snap.store_retries.get(store, 0),
                 {"store": store, "layer": "request"})  # fmt: skip
        p.sample("ckptd_retries_total", snap.upload_retries.get(store, 0),
                 {"store": store, "layer": "upload"})  # fmt: skip
    p.family("ckptd_failures_total", "counter", "Checkpoints (or parts) that failed for good.")
    p.sample("ckptd_failures_total", st.failures)
    p.family("ckptd_stage_duration_seconds", "histogram",
             "Seconds per stage (write, commit, upload), observed when a checkpoint ends.")  # fmt: skip
    for stage, h in st.durations.items():
        for le, n in h.cumulative():
            p.sample("ckptd_stage_duration_seconds_bucket", n, {"stage": stage, "le": le})
        p.sample("ckptd_stage_duration_seconds_sum", round(h.sum, 6), {"stage": stage})
        p.sample("ckptd_stage_duration_seconds_count", h.count, {"stage": stage})
    phases: dict[str, int] = {}
    for job in snap.jobs:
        if job.pending:
            phases[str(job.phase)] = phases.get(str(job.phase), 0) + 1
    p.family("ckptd_jobs", "gauge", "Checkpoints in progress, by phase.")
    for phase in ("queued", "writing", "committed", "uploading", "finishing"):
        p.sample("ckptd_jobs", phases.get(phase, 0), {"phase": phase})
    p.family("ckptd_upload_queue_depth", "gauge", "Uploads waiting for a worker.")
    p.sample("ckptd_upload_queue_depth", snap.upload_queue)
    p.family("ckptd_clients", "gauge", "Connected training processes.")
    p.sample("ckptd_clients", snap.clients)
    p.family("ckptd_preempted", "gauge", "1 once a spot/preemption notice arrived.")
    p.sample("ckptd_preempted", int(snap.preempted))
    p.family("ckptd_last_upload_timestamp_seconds", "gauge",
             "When the run's last checkpoint reached its store (Unix time).")  # fmt: skip
    for run, at in sorted(st.last_upload.items()):
        p.sample("ckptd_last_upload_timestamp_seconds", round(at, 3), {"run": run})
    p.family("ckptd_seconds_since_newest_durable_checkpoint", "gauge",
             "Age of the newest checkpoint of the run that is in its store: the training time "
             "a lost node would cost.")  # fmt: skip
    for run, (_, created) in sorted(st.newest_durable.items()):
        age = round(max(0.0, snap.now - created), 3)
        p.sample("ckptd_seconds_since_newest_durable_checkpoint", age, {"run": run})
    p.family("ckptd_newest_durable_step", "gauge", "Step of that checkpoint.")
    for run, (step, _) in sorted(st.newest_durable.items()):
        p.sample("ckptd_newest_durable_step", step, {"run": run})
    return p.text()


class MetricsServer:
    """``/metrics`` over HTTP/1.1 on ``host:port`` (port 0: any free one, see ``port``)."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], Snapshot]) -> None:
        self.host = host
        self.port = port
        self._snapshot = snapshot
        self._server: asyncio.Server | None = None
        self._open = 0

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=MAX_REQUEST
            )
        except OSError as e:  # in use, or not an address of this machine
            raise ConfigError(f"cannot serve metrics on {self.host}:{self.port}: {e}") from e
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > MAX_CONNECTIONS:
                return
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            status, ctype, body = self._answer(head)
            lines = [f"HTTP/1.1 {status}", f"Content-Type: {ctype}",
                     f"Content-Length: {len(body)}", "Connection: close", "", ""]  # fmt: skip
            writer.write("\r\n".join(lines).encode())
            if not head.startswith(b"HEAD "):
                writer.write(body)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (OSError, TimeoutError):
            pass
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    def _answer(self, head: bytes) -> tuple[str, str, bytes]:
        request, _, rest = head.decode("latin-1").partition("\r\n")
        parts = request.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", "text/plain", b"bad request\n"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"only GET /metrics\n"
        if target != "/metrics":
            return "404 Not Found", "text/plain", b"see /metrics\n"
        accept = next((line.split(":", 1)[1] for line in rest.split("\r\n")
                       if line.lower().startswith("accept:")), "")  # fmt: skip
        om = "application/openmetrics-text" in accept
        body = render(self._snapshot(), openmetrics=om).encode()
        return "200 OK", OPENMETRICS_TYPE if om else TEXT_TYPE, body
