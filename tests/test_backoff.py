"""Backoff with full jitter (``ckptd.storage.backoff``) and throttling answers: the schedule as a
pure function of an injected generator, draws that differ between processes however the
training script seeds ``random``, and SlowDown / 503 / 429 retried as ``ThrottledError`` and
counted in the store's retries."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from ckptd.errors import ThrottledError, TransientStorageError
from ckptd.storage import backoff
from ckptd.storage.gcs import GCSStore
from ckptd.storage.retry import with_retries
from ckptd.storage.s3 import S3Store
from tests.faultproxy import FaultProxy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ceiling_doubles_up_to_the_cap() -> None:
    assert [backoff.ceiling(n, 0.25, 20.0) for n in range(1, 10)] == [
        0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0,
    ]  # fmt: skip
    assert backoff.ceiling(10_000, 0.25, 20.0) == 20.0  # no float overflow
    with pytest.raises(ValueError):
        backoff.ceiling(0, 0.25, 20.0)


def test_delays_are_full_jitter_below_the_ceiling() -> None:
    rng = random.Random(1)
    for n in range(1, 12):
        draws = [backoff.delay(n, base=0.25, cap=20.0, rng=rng) for _ in range(400)]
        top = backoff.ceiling(n, 0.25, 20.0)
        assert all(0.0 <= d <= top for d in draws)
        # full jitter: spread over the whole interval, not bunched at its end
        assert min(draws) < 0.1 * top and max(draws) > 0.9 * top


def test_schedule_is_a_function_of_the_generator() -> None:
    a = backoff.schedule(6, base=0.25, cap=20.0, rng=random.Random(7))
    b = backoff.schedule(6, base=0.25, cap=20.0, rng=random.Random(7))
    c = backoff.schedule(6, base=0.25, cap=20.0, rng=random.Random(8))
    assert len(a) == 5 and a == b != c
    expected = random.Random(7)
    assert a == [expected.uniform(0, backoff.ceiling(n, 0.25, 20.0)) for n in range(1, 6)]


def test_throttles_back_off_from_a_longer_base() -> None:
    plain = backoff.schedule(5, base=0.25, cap=100.0, rng=random.Random(3))
    slow = backoff.schedule(5, base=0.25, cap=100.0, throttled=True, rng=random.Random(3))
    assert slow == [d * backoff.THROTTLE_FACTOR for d in plain]


def test_spreads_many_ranks_retrying_at_once() -> None:
    """1,000 ranks throttled at the same moment: their next tries land all over the window."""
    ranks = [random.Random(r) for r in range(1000)]
    draws = [backoff.delay(3, base=0.25, cap=20.0, throttled=True, rng=g) for g in ranks]
    top = backoff.ceiling(3, 0.25 * backoff.THROTTLE_FACTOR, 20.0)
    buckets = [0] * 10
    for d in draws:
        buckets[min(int(d / top * 10), 9)] += 1
    assert all(60 <= n <= 140 for n in buckets), buckets  # ~100 per tenth: no thundering herd


_DRAW = (
    "import random; random.seed(0); from ckptd.storage import backoff; "
    "print(backoff.delay(6, base=1.0, cap=100.0))"
)


def test_processes_seeded_alike_draw_differently() -> None:
    """Every rank calls random.seed(0); the backoff generator is the process's own."""
    env = {**os.environ, "PYTHONPATH": REPO}
    run = [sys.executable, "-c", _DRAW]
    draws = {
        subprocess.run(run, capture_output=True, text=True, env=env, check=True, timeout=60).stdout
        for _ in range(3)
    }
    assert len(draws) == 3, draws
    random.seed(0)
    assert backoff.process_rng() is not random._inst  # type: ignore[attr-defined]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_children_reseed() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its first draw
        os.close(r)
        os.write(w, repr(backoff.process_rng().random()).encode())
        os._exit(0)
    os.close(w)
    child = float(os.read(r, 100).decode())
    os.close(r)
    os.waitpid(pid, 0)
    assert child != backoff.process_rng().random()


async def test_with_retries_retries_throttles_by_type() -> None:
    calls: list[int] = []
    seen: list[BaseException] = []

    async def fn() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ThrottledError("SlowDown")
        return "ok"

    out = await with_retries(fn, attempts=4, base_delay=0.001, what="t",
                             on_retry=lambda n, e: seen.append(e))  # fmt: skip
    assert out == "ok" and len(calls) == 3
    assert all(isinstance(e, ThrottledError) for e in seen)


@pytest.mark.parametrize("status", [503, 429])
async def test_s3_slowdown_is_a_counted_throttle(
    s3_proxy: FaultProxy, s3_bucket: str, status: int
) -> None:
    seen: list[BaseException] = []
    st = S3Store(s3_bucket, "runs", retry_base_delay=0.005, on_retry=lambda n, e: seen.append(e))
    s3_proxy.fail_next(2, status, match="/runs/r/x ")  # answered <Code>SlowDown</Code>
    await st.put_bytes("r/x", b"x")
    assert st.retries == 2 and all(isinstance(e, ThrottledError) for e in seen), seen
    s3_proxy.fail_next(1, 500, match="/runs/r/x ")  # InternalError: transient, not a throttle
    assert await st.get_bytes("r/x") == b"x"
    assert st.retries == 3 and type(seen[-1]) is TransientStorageError
    assert s3_proxy.count(f"/{s3_bucket}/runs/r/", injected=True) == {
        "PutObject": 2,
        "GetObject": 1,
    }
    await st.close()


async def test_gcs_429_is_a_counted_throttle(gcs_proxy: FaultProxy, gcs_bucket: str) -> None:
    seen: list[BaseException] = []
    st = GCSStore(gcs_bucket, "runs", retry_base_delay=0.005, on_retry=lambda n, e: seen.append(e))
    await st.put_bytes("r/warm", b"w")  # the store's first use probes it: done now
    gcs_proxy.fail_next(2, 429, match="uploadType=multipart")
    await st.put_bytes("r/x", b"x")
    assert st.retries == 2 and all(isinstance(e, ThrottledError) for e in seen), seen
    await st.close()
