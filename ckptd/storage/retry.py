"""Retry with exponential backoff and full jitter, deciding by exception type alone.

Backends translate their SDK's errors into ``TransientStorageError`` at one boundary; this helper
retries exactly that type and lets everything else (permanent errors, integrity errors,
cancellation) through at once, so a retry decision never depends on parsing messages.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..errors import ThrottledError, TransientStorageError
from .backoff import delay as backoff_delay

T = TypeVar("T")

OnRetry = Callable[[int, BaseException], None]
"""Called as ``on_retry(attempt, exc)`` before sleeping; ``attempt`` counts from 1."""

log = logging.getLogger(__name__)


async def with_retries(
    fn: Callable[[], Awaitable[T]],
    *,
    attempts: int = 6,
    base_delay: float = 0.25,
    max_delay: float = 20.0,
    what: str,
    on_retry: OnRetry | None = None,
) -> T:
    """Await ``fn()``, retrying ``TransientStorageError`` until ``attempts`` calls have failed.

    Full jitter (sleep uniformly in [0, min(max_delay, base_delay * 2**n)]) spreads the retries of
    many concurrent parts so they do not hammer a throttling server in lockstep; the draws come
    from this process's own generator (``backoff``), so ranks seeded alike still differ, and a
    ``ThrottledError`` backs off from a longer base.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    attempt = 1
    while True:
        try:
            return await fn()
        except TransientStorageError as e:
            if attempt >= attempts:
                # The caller says it once (the daemon rate-limits per checkpoint): a store that
                # is down fails every request alike, and a line each would bury the cause.
                log.debug("%s failed after %d attempts: %s", what, attempt, e)
                raise
            if on_retry is not None:
                on_retry(attempt, e)
            delay = backoff_delay(
                attempt,
                base=base_delay,
                cap=max_delay,
                throttled=isinstance(e, ThrottledError),
            )
            log.debug("%s: attempt %d failed (%s); retrying in %.2fs", what, attempt, e, delay)
            await asyncio.sleep(delay)
            attempt += 1


__all__ = ["OnRetry", "with_retries"]
