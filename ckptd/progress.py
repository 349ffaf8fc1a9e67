"""A progress line on a terminal for long reads: downloads from a store and checksum passes.

A user restoring tens of GiB from a bucket should see that something moves, and how fast; a
training log, a pipe or a CI job must never see a ``\\r``. So the line is drawn on stderr only
when it is a TTY and the work has already run for about a second (short work prints nothing),
and ``CKPTD_PROGRESS=0`` silences it anyway. A ``Progress`` is a ``ProgressFn`` (called with a
delta of bytes); callbacks may come from several threads (downloads run in workers), so the
counter and the line are guarded by one lock. No torch here: the CLI and the daemon import it.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

__all__ = ["Progress", "enabled", "human_bytes", "human_duration"]

_OFF = ("0", "false", "no", "off")


def enabled(stream: TextIO, isatty: bool | None = None) -> bool:
    """Whether a line may be drawn on ``stream``: a TTY (or ``isatty``) and not switched off."""
    if os.environ.get("CKPTD_PROGRESS", "").strip().lower() in _OFF:
        return False
    if isatty is not None:
        return isatty
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``: binary units, one decimal (whole bytes below 1 KiB)."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def human_duration(s: float) -> str:
    """Seconds as ``42s``, ``3m05s`` or ``2h07m``: an ETA needs no more precision."""
    n = max(0, round(s))
    if n < 60:
        return f"{n}s"
    if n < 3600:
        return f"{n // 60}m{n % 60:02d}s"
    return f"{n // 3600}h{n % 3600 // 60:02d}m"


class Progress:
    """Bytes done out of ``total``, drawn as one updating line (see the module docstring).

    Use as a context manager (or call ``close``): the end prints a final line, when a line was
    shown or the work took longer than ``delay``. ``stream``, ``isatty``, ``clock`` and
    ``columns`` exist for tests.
    """

    def __init__(
        self,
        total: int,
        label: str = "",
        *,
        stream: TextIO | None = None,
        isatty: bool | None = None,
        delay: float = 1.0,
        interval: float = 0.2,
        window: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
        columns: int | None = None,
    ) -> None:
        self.total = max(0, int(total))
        self.label = label
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._on = enabled(self._stream, isatty)
        self._delay = delay  # before the first line: short work prints nothing
        self._interval = interval  # between redraws: a callback per 64 KiB must not flood
        self._window = window  # the rate is over the last few seconds, not since the start
        self._clock = clock
        self._columns = columns
        self._lock = threading.Lock()
        self._start = clock()
        self._samples: deque[tuple[float, int]] = deque([(self._start, 0)])
        self._drawn_at: float | None = None  # when the line was last drawn; None: never
        self._width = 0  # of the line on screen, to blank what a shorter one leaves over
        self._closed = False

    def __call__(self, n: int) -> None:
        """Count ``n`` more bytes done (a ``ProgressFn``); redraws at most every ``interval``."""
        with self._lock:
            if self._closed:
                return
            self.done += n
            now = self._clock()
            if now - self._samples[-1][0] >= self._interval / 2:  # bounded, however often called
                self._samples.append((now, self.done))
            while len(self._samples) > 2 and self._samples[1][0] <= now - self._window:
                self._samples.popleft()
            if not self._on or now - self._start < self._delay:
                return
            if self._drawn_at is not None and now - self._drawn_at < self._interval:
                return
            self._draw(self._status(now), now)

    def close(self, ok: bool = True) -> None:
        """End the line: a summary (or where it stopped, when ``ok`` is false). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            now = self._clock()
            elapsed = now - self._start
            if not self._on or (self._drawn_at is None and elapsed < self._delay):
                return
            if ok:
                rate = self.done / elapsed if elapsed > 0 else 0.0
                line = f"{human_bytes(self.done)} in {human_duration(elapsed)}"
                line += f" ({_mib(rate)})"
            else:
                line = f"stopped at {self._amount()} after {human_duration(elapsed)}"
            self._draw(line, now, end="\n")

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(ok=typ is None)

    # ---- the line (under the lock) -------------------------------------------------------------

    def _amount(self) -> str:
        pct = 100.0 if not self.total else min(100.0, 100.0 * self.done / self.total)
        return f"{human_bytes(self.done)} / {human_bytes(self.total)} ({pct:.0f}%)"

    def _status(self, now: float) -> str:
        t0, d0 = self._samples[0]
        rate = (self.done - d0) / (now - t0) if now > t0 else 0.0
        left = max(0, self.total - self.done)
        eta = human_duration(left / rate) if rate > 0 else "--"
        speed = _mib(rate) if rate > 0 else "-- MiB/s"
        return f"{self._amount()}  {speed}  ETA {eta}"

    def _draw(self, status: str, now: float, end: str = "") -> None:
        columns = self._columns or shutil.get_terminal_size((80, 24)).columns
        room = columns - 1 - len(status) - 2  # one column spare: a full line would wrap
        label = self.label
        if len(label) > room:
            label = "…" + label[len(label) - room + 1 :] if room > 1 else ""
        line = f"{label}: {status}" if label else status
        pad = max(0, self._width - len(line))
        try:
            self._stream.write("\r" + line + " " * pad + end)
            self._stream.flush()
        except (OSError, ValueError):  # a closed or broken terminal: the work goes on
            self._on = False
        self._width = 0 if end else len(line)
        self._drawn_at = now


def _mib(rate: float) -> str:
    return f"{rate / (1 << 20):.1f} MiB/s"
