"""The daemon's upload bandwidth limit: one token bucket shared by every upload it runs.

Stores await ``TokenBucket.acquire(n)`` with each part's size just before sending it (see
``Store.pace``), so concurrent uploads of several checkpoints, ranks' parts and mirrored records
share one budget. A part larger than the bucket still goes, after waiting for the debt it makes
to be paid back: the long-run rate stays at ``rate`` whatever the part size. Waiters are served in
arrival order, because each reservation is taken at once and only the wait is deferred.

``parse_rate`` reads the human form the CLI takes (``100MB/s``, ``1.5GiB/s``, ``800Mbit/s``).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable

from ..errors import ConfigError

_RATE = re.compile(
    r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kKmMgGtT]?)(i?)(B|b|bits?|Bits?)?\s*(?:/s|ps)?\s*$"
)


def parse_rate(text: str) -> float:
    """Bytes per second from a human rate: ``100MB/s``, ``50MiB/s``, ``800Mbit/s``, ``1Gbps``.

    Decimal prefixes (k, M, G, T) are powers of 1000, binary ones (KiB, MiB, ...) of 1024;
    ``B`` is bytes, ``b`` or ``bit`` bits; a bare number is bytes per second.
    """
    m = _RATE.match(text)
    if m is None:
        raise ConfigError(
            f"cannot read {text!r} as a rate: use a number and a unit such as 100MB/s, "
            "50MiB/s or 800Mbit/s"
        )
    number, prefix, binary, unit = m.groups()
    prefix = prefix.lower()
    if binary and not prefix:
        raise ConfigError(f"cannot read {text!r} as a rate: 'i' needs a prefix (KiB, MiB, ...)")
    power = " kmgt".index(prefix) if prefix else 0
    value = float(number) * (1024 if binary else 1000) ** power
    if unit is not None and unit != "B":
        value /= 8
    if value <= 0:
        raise ConfigError(f"an upload limit must be positive, not {text!r}")
    return value


def human_rate(rate: float) -> str:
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if rate >= scale:
            return f"{rate / scale:.3g} {unit}"
    return f"{rate:.3g} B/s"


class TokenBucket:
    """``rate`` bytes per second on average, bursts of up to ``burst`` bytes (default: one
    second's worth). ``clock`` and ``sleep`` are injectable so tests run on a fake clock."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ConfigError(f"a bandwidth limit must be positive, not {rate!r}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        if self.burst <= 0:
            raise ConfigError(f"a burst must be positive, not {burst!r}")
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._last = clock()
        self.waited = 0.0
        """Seconds callers spent waiting in total (for ``status`` and tests)."""

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    async def acquire(self, n: int) -> None:
        """Take ``n`` bytes' worth now; return once the bucket has paid for them."""
        if n <= 0:
            return
        self._refill()
        self._tokens -= n  # reserved at once: later callers queue behind this debt
        if self._tokens >= 0:
            return
        wait = -self._tokens / self.rate
        self.waited += wait
        try:
            await self._sleep(wait)
        except asyncio.CancelledError:
            self._refill()
            self._tokens = min(self.burst, self._tokens + n)  # not sent: give the bytes back
            raise


__all__ = ["TokenBucket", "human_rate", "parse_rate"]
