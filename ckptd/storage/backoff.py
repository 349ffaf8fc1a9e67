"""Backoff delays with full jitter, from a random source of this process's own.

When a store throttles (S3 ``SlowDown``/503, GCS 429), thousands of ranks see it at the same
moment; if they also retry at the same moments they throttle again in lockstep. Full jitter
(a delay drawn uniformly in ``[0, min(cap, base * 2**(attempt-1))]``) spreads them, but only if
the draws differ between processes: training scripts call ``random.seed(0)`` on every rank, which
would make the module-level generator identical everywhere. So delays come from a private
generator seeded from ``os.urandom`` when this module loads and again in every forked child.

``delay()`` is a pure function of its arguments and an injected generator, so the schedule is
tested without sleeping or patching anything.
"""

from __future__ import annotations

import os
import random

THROTTLE_FACTOR = 4.0
"""Throttling answers back off from a base this many times the ordinary one: the server asked us
to slow down, and S3 takes seconds to minutes to split a hot prefix partition."""


def _seeded() -> random.Random:
    return random.Random(int.from_bytes(os.urandom(16), "big"))


_rng = _seeded()


def _reseed_after_fork() -> None:
    global _rng
    _rng = _seeded()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed_after_fork)


def process_rng() -> random.Random:
    """This process's own generator (never shared with ``random``'s module-level one)."""
    return _rng


def ceiling(attempt: int, base: float, cap: float) -> float:
    """The upper bound of the delay after failed attempt number ``attempt`` (from 1)."""
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    if base < 0 or cap < 0:
        raise ValueError("base and cap must be >= 0")
    # 2**n overflows a float past n ~ 1000; the cap is reached long before.
    return min(cap, base * (2.0 ** min(attempt - 1, 64)))


def delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    throttled: bool = False,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait after failed attempt ``attempt``: uniform in ``[0, ceiling]`` (full
    jitter), the ceiling from ``base * THROTTLE_FACTOR`` when the server throttled us."""
    b = base * THROTTLE_FACTOR if throttled else base
    return (rng or _rng).uniform(0.0, ceiling(attempt, b, cap))


def schedule(
    attempts: int,
    *,
    base: float,
    cap: float,
    throttled: bool = False,
    rng: random.Random | None = None,
) -> list[float]:
    """The delays between ``attempts`` tries (``attempts - 1`` of them), for tests and plans."""
    return [delay(n, base=base, cap=cap, throttled=throttled, rng=rng) for n in range(1, attempts)]


__all__ = ["THROTTLE_FACTOR", "ceiling", "delay", "process_rng", "schedule"]
