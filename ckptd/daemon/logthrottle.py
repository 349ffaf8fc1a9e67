"""Rate-limit repeated log lines: one line per key per interval, with a count of the rest.

A store that is down fails every upload attempt of every checkpoint the same way; logging each
one buries the one line an operator needs. ``Throttle.allow(key)`` says whether a line for
``key`` may be written now and how many were held back since the last one, so the line that is
written can say "(12 more like this in 30 s)". No I/O, no clock of its own (tests pass one).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Throttle", "suppressed_note"]


@dataclass(slots=True)
class _Slot:
    last: float
    held: int = 0


class Throttle:
    """At most one line per key per ``interval`` seconds; at most ``max_keys`` keys remembered
    (the oldest are forgotten, so a daemon that runs for months stays small)."""

    def __init__(
        self,
        interval: float = 30.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._max = max_keys
        self._slots: dict[str, _Slot] = {}

    def allow(self, key: str) -> int | None:
        """None: hold this line back (it is counted). Else the number held back since the last
        line for ``key``; the caller writes its line now."""
        now = self._clock()
        slot = self._slots.get(key)
        if slot is not None and now - slot.last < self.interval:
            slot.held += 1
            return None
        held = slot.held if slot is not None else 0
        self._slots.pop(key, None)
        self._slots[key] = _Slot(now)  # re-inserted: dict order is least recently logged first
        while len(self._slots) > self._max:
            del self._slots[next(iter(self._slots))]
        return held

    def forget(self, key: str) -> int:
        """Drop ``key`` (its trouble is over); returns how many lines were still held back."""
        slot = self._slots.pop(key, None)
        return slot.held if slot is not None else 0


def suppressed_note(held: int, interval: float) -> str:
    """`` (3 more like this in the last 30 s)`` or nothing: appended to the line written."""
    if held <= 0:
        return ""
    return f" ({held} more like this in the last {interval:.0f} s)"
