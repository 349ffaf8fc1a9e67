"""Unit: the upload bandwidth limit's token bucket (on a fake clock) and its rate parser."""

from __future__ import annotations

import asyncio

import pytest

from ckptd.daemon.bandwidth import TokenBucket, human_rate, parse_rate
from ckptd.errors import ConfigError

MB = 10**6


class FakeClock:
    """Time moves only when a caller sleeps on it; every requested sleep is recorded."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _bucket(rate: float, burst: float | None = None) -> tuple[TokenBucket, FakeClock]:
    clock = FakeClock()
    return TokenBucket(rate, burst, clock=clock, sleep=clock.sleep), clock


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("100MB/s", 100e6),
        ("100 MB/s", 100e6),
        ("50MiB/s", 50 * 2**20),
        ("1.5GiB/s", 1.5 * 2**30),
        ("800Mbit/s", 100e6),
        ("1Gbps", 125e6),
        ("8Mb/s", 1e6),
        ("2kB", 2000),
        ("12345", 12345),
        ("10M", 10e6),
    ],
)
def test_parse_rate_reads_human_units(text: str, rate: float) -> None:
    assert parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize("text", ["", "fast", "-5MB/s", "0MB/s", "10XB/s", "5iB/s", "1e6"])
def test_parse_rate_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_rate(text)


def test_human_rate() -> None:
    assert human_rate(100e6) == "100 MB/s"
    assert human_rate(1.5e9) == "1.5 GB/s"
    assert human_rate(500) == "500 B/s"


def test_a_burst_goes_at_once_then_the_rate_holds() -> None:
    async def go() -> None:
        bucket, clock = _bucket(10 * MB, burst=5 * MB)
        await bucket.acquire(5 * MB)  # the full bucket: no wait
        assert clock.sleeps == []
        start = clock.now
        for _ in range(10):
            await bucket.acquire(2 * MB)
        # 20 MB at 10 MB/s, the bucket being empty: 2 s of waiting, never less
        assert clock.now - start == pytest.approx(2.0)
        assert bucket.waited == pytest.approx(2.0)

    asyncio.run(go())


def test_a_part_larger_than_the_bucket_waits_for_its_debt() -> None:
    async def go() -> None:
        bucket, clock = _bucket(10 * MB, burst=1 * MB)
        await bucket.acquire(31 * MB)
        assert clock.sleeps == [pytest.approx(3.0)]  # (31 - 1) MB at 10 MB/s

    asyncio.run(go())


def test_idle_time_refills_only_up_to_the_burst() -> None:
    async def go() -> None:
        bucket, clock = _bucket(10 * MB, burst=4 * MB)
        await bucket.acquire(4 * MB)
        clock.now += 3600  # an hour idle earns no more than the burst
        await bucket.acquire(4 * MB)
        assert clock.sleeps == []
        await bucket.acquire(1 * MB)
        assert clock.sleeps == [pytest.approx(0.1)]

    asyncio.run(go())


def test_concurrent_callers_share_the_rate_in_arrival_order() -> None:
    async def go() -> None:
        clock = FakeClock()
        gate = asyncio.Event()
        asked: list[float] = []

        async def held_sleep(seconds: float) -> None:
            asked.append(seconds)
            await gate.wait()  # nobody finishes before every caller has reserved

        bucket = TokenBucket(10 * MB, 1 * MB, clock=clock, sleep=held_sleep)
        await bucket.acquire(1 * MB)  # empty the bucket
        tasks = [asyncio.ensure_future(bucket.acquire(2 * MB)) for _ in range(3)]
        while len(asked) < 3:
            await asyncio.sleep(0)
        # each reservation queues behind the ones before it: 0.2 s, 0.4 s, 0.6 s
        assert asked == [pytest.approx(0.2), pytest.approx(0.4), pytest.approx(0.6)]
        gate.set()
        await asyncio.gather(*tasks)

    asyncio.run(go())


def test_a_cancelled_wait_gives_its_bytes_back() -> None:
    async def go() -> None:
        clock = FakeClock()
        never = asyncio.Event()
        hold = [True]

        async def sleep(seconds: float) -> None:
            if hold[0]:
                await never.wait()
            await clock.sleep(seconds)

        bucket = TokenBucket(10 * MB, 1 * MB, clock=clock, sleep=sleep)
        task = asyncio.ensure_future(bucket.acquire(5 * MB))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        hold[0] = False
        clock.now += 0.1  # 1 MB earned: the bucket is full again, not 4 MB in debt
        await bucket.acquire(1 * MB)
        assert clock.sleeps == []

    asyncio.run(go())


def test_bad_rates_are_refused() -> None:
    with pytest.raises(ConfigError):
        TokenBucket(0)
    with pytest.raises(ConfigError):
        TokenBucket(1, burst=0)
