"""What ``ckptd status`` and ``status --watch`` draw: a pure function from the daemon's status
reply and the terminal's size to lines, so that the screen can be tested without a terminal.

An operator glances at it during a long upload, often in a small pane: so the header (pid,
uptime, store, clients, queue, closing/preempted) always comes first and never scrolls away;
each checkpoint takes one line, whatever its error says, cut to the width; work in progress
comes before the last few finished, and one line sums up everything older. Every number is in
human units (KiB/MiB/GiB, B/s, ``3m12s``). A checkpoint that waits says what it waits for,
never "0 B at 0 B/s". Fields are described in docs/status.md; a daemon older than them still
renders (missing fields are derived or left out). No torch, no I/O here.
"""

from __future__ import annotations

import time
from typing import Any

from .progress import human_bytes, human_duration

__all__ = ["ACTIVE", "job_line", "render"]

ACTIVE = ("queued", "writing", "committed", "uploading", "finishing")
"""Phases of a checkpoint still in progress; the rest (uploaded, failed, dropped, local-only)
are finished."""
BAR = 10  # characters inside the progress bar's brackets
MIN_NAME = 16
IDLE = 3.0  # seconds without progress before a line says so


def render(
    st: dict[str, Any],
    columns: int | None = 80,
    rows: int | None = None,
    *,
    now: float | None = None,
) -> list[str]:
    """The screen for status reply ``st``: at most ``rows`` lines (None: no limit), each
    shorter than ``columns`` (None: not cut; for pipes)."""
    now = time.time() if now is None else now
    jobs = [dict(j, phase=_phase(j)) for j in st.get("jobs", [])]
    active = [j for j in jobs if j["phase"] in ACTIVE]
    finished = [j for j in jobs if j["phase"] not in ACTIVE]
    width = _name_width(jobs, columns)
    head = _header(st)
    summary = _summary(st.get("summary"), now)
    room = None if rows is None else max(0, rows - len(head) - (1 if summary else 0))
    body: list[str] = []
    if active:
        lines = [_active_line(j, width, now, columns) for j in active]
        body += _fit(["in progress:"] + [f"  {x}" for x in lines], room, "in progress")
    if finished and (room is None or room - len(body) >= 2):
        lines = [_finished_line(j, width, now) for j in finished[::-1]]  # newest first
        left = None if room is None else room - len(body)
        body += _fit(["finished:"] + [f"  {x}" for x in lines], left, "finished")
    if not jobs and (room is None or room > len(body)):
        body.append("no checkpoints yet")
    out = head + body + ([summary] if summary else [])
    if rows is not None:
        out = out[:rows]
    return [_cut(line, columns) for line in out]


def job_line(j: dict[str, Any], *, now: float | None = None) -> str:
    """One job (``Job.as_dict``) as the screen shows it, uncut (for ``drain``'s list)."""
    now = time.time() if now is None else now
    j = dict(j, phase=_phase(j))
    width = len(_name(j))
    return (_active_line if j["phase"] in ACTIVE else _finished_line)(j, width, now)


# ---- the parts ------------------------------------------------------------------------------


def _header(st: dict[str, Any]) -> list[str]:
    flags = "".join(
        f"  {flag}"
        for flag, on in (("PREEMPTED", st.get("preempted")), ("CLOSING", st.get("closing")))
        if on
    )
    first = (
        f"ckptd {st.get('version', '?')}  pid {st.get('pid', '?')}  "
        f"up {human_duration(float(st.get('uptime') or 0))}  clients {st.get('clients', 0)}  "
        f"upload queue {st.get('upload_queue', 0)}{flags}"
    )
    second = f"store {st.get('store') or '(the root)'}  root {st.get('root', '?')}  socket {st.get('socket', '?')}"
    totals = f"written {human_bytes(st.get('bytes_written') or 0)}  uploaded {human_bytes(st.get('bytes_uploaded') or 0)}"
    if st.get("bytes_deduped"):
        totals += f"  deduped {human_bytes(st['bytes_deduped'])}"
    if st.get("saves") is not None:
        totals += f"  saves {st['saves']}  failed {st.get('failures') or 0}"
    retries = sum((st.get("store_retries") or {}).values())
    if retries:
        totals += f"  request retries {retries}"
    if st.get("metrics"):
        totals += f"  metrics {st['metrics']}"
    return [first, second, totals]


def _summary(summary: dict[str, Any] | None, now: float) -> str:
    if not summary or not summary.get("jobs"):
        return ""
    counts = ", ".join(f"{n} {phase}" for phase, n in sorted(summary.get("counts", {}).items()))
    since = summary.get("since")
    ago = f" since {human_duration(now - since)} ago" if since else ""
    return f"earlier: {summary['jobs']} checkpoint(s) ({counts}), {human_bytes(summary.get('bytes') or 0)}{ago}"


def _fit(lines: list[str], room: int | None, what: str) -> list[str]:
    """``lines`` (a title and its items) in at most ``room`` lines, the cut ones counted."""
    if room is None or len(lines) <= room:
        return lines
    if room <= 1:
        return []
    keep = room - 2  # the title, the items that fit, one line saying how many did not
    return [
        *lines[: 1 + keep],
        f"  ... {len(lines) - 1 - keep} more {what} (ckptd status --json lists them)",
    ]


def _name(j: dict[str, Any]) -> str:
    return f"{j.get('run')}@{j.get('tag')}" + (f" part {j['part']}" if j.get("part") else "")


def _name_width(jobs: list[dict[str, Any]], columns: int | None) -> int:
    longest = max((len(_name(j)) for j in jobs), default=MIN_NAME)
    if columns is None:
        return longest
    return max(MIN_NAME, min(longest, columns * 2 // 5))


def _phase(j: dict[str, Any]) -> str:
    """The job's phase; derived from its state when a daemon older than ``phase`` sent it."""
    if j.get("phase"):
        return str(j["phase"])
    state = str(j.get("state", "?"))
    if state == "staged" or (state == "committed" and j.get("store")):
        return "queued"
    if (
        state == "uploading"
        and j.get("bytes_total")
        and j.get("bytes_uploaded", 0) >= j["bytes_total"]
    ):
        return "finishing"
    return state


def _bar(done: int, total: int) -> str:
    frac = min(1.0, done / total) if total else 1.0
    filled = int(frac * BAR)
    return f"[{'#' * filled}{'.' * (BAR - filled)}] {100 * frac:3.0f}%"


def _trouble(j: dict[str, Any]) -> str:
    """Retries and the last error (or the reason it is not in its store), as one line's tail."""
    bits = []
    if j.get("retries"):
        bits.append(f"retries {j['retries']}")
    text = str(j.get("error") or "")
    for said in (
        f"upload of {_name(j).replace(' part ', '#')} to {j.get('store')} ",
        f"{_name(j)}: ",
    ):
        text = text.removeprefix(said)  # the line names the checkpoint already
    if j.get("reason") and j["reason"] not in text:
        text = f"{j['reason']}: {text}" if text else str(j["reason"])
    if text:
        bits.append(" ".join(str(text).split()))  # one line, whatever the error held
    return "  " + "  ".join(bits) if bits else ""


def _active_line(j: dict[str, Any], width: int, now: float, columns: int | None = None) -> str:
    phase = j["phase"]
    total = int(j.get("bytes_total") or 0)
    name = _name(j)
    name = name if len(name) <= width else "…" + name[len(name) - width + 1 :]
    lead = f"{name:<{width}}  {phase:<9}  "
    if phase == "queued":
        what = (
            "committed, waiting for an upload worker"
            if j.get("committed_at")
            else "waiting for a writer"
        )
        return f"{lead}{_size(j)}, {what}{_trouble(j)}"
    if phase == "committed":
        at = j.get("retry_at")
        when = f", next upload try in {human_duration(at - now)}" if at else ""
        return f"{lead}{_size(j)} on local disk{when}{_trouble(j)}"
    if phase == "finishing":
        return (
            f"{lead}all {human_bytes(total)} sent; completing upload, manifest, latest{_trouble(j)}"
        )
    done = int(
        j.get("bytes_done", j.get("bytes_uploaded" if phase == "uploading" else "bytes_written"))
        or 0
    )
    rate = float(j.get("rate", j.get("upload_rate", 0.0)) or 0.0)
    eta = j.get("eta")
    if eta is None and rate > 0:
        eta = max(0, total - done) / rate
    idle = j.get("idle")
    if rate > 0:
        speed = f"{human_bytes(rate)}/s"
    elif idle is not None and idle >= IDLE:
        speed = f"no progress for {human_duration(idle)}"
    else:
        speed = "starting" if not done else "measuring"
    left = (
        "ETA --" if eta is None else "ETA >4d" if eta > 4 * 86400 else f"ETA {human_duration(eta)}"
    )
    amount = f"{human_bytes(done)}/{human_bytes(total)}  {speed}  {left}"
    line = f"{lead}{_bar(done, total)} {amount}"
    if columns is not None and len(line) + 3 >= columns:  # the numbers matter more than the bar
        line = f"{lead}{_bar(done, total)[-4:].strip()} {amount}"
    return line + _trouble(j)


def _size(j: dict[str, Any]) -> str:
    """The checkpoint's size, and how much of it was new (incremental checkpoints)."""
    total = int(j.get("bytes_total") or 0)
    new = j.get("bytes_new")
    if isinstance(new, int) and new < total:
        return f"{human_bytes(total)} ({human_bytes(new)} new)"
    return human_bytes(total)


def _finished_line(j: dict[str, Any], width: int, now: float) -> str:
    phase = j["phase"]
    name = _name(j)
    name = name if len(name) <= width else "…" + name[len(name) - width + 1 :]
    lead = f"{name:<{width}}  {phase:<9}  {_size(j)}"
    if phase == "uploaded":
        at = j.get("uploaded_at")
        start = j.get("upload_started")
        took = ""
        if at and start:
            rate = j.get("upload_rate") or 0.0
            took = f" in {human_duration(at - start)}" + (
                f" ({human_bytes(rate)}/s)" if rate else ""
            )
        ago = f", {human_duration(now - at)} ago" if at else ""
        return f"{lead}{took}{ago}{_trouble(j) if j.get('retries') else ''}"
    if phase == "local-only":
        return f"{lead} kept on local disk only"
    return f"{lead}{_trouble(j)}"


def _cut(line: str, columns: int | None) -> str:
    """One screen line: cut to ``columns - 1`` (a full line wraps in some terminals)."""
    if columns is None or len(line) < columns:
        return line
    return line[: max(0, columns - 2)] + "…" if columns > 1 else ""
