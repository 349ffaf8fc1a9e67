"""with_retries: retries TransientStorageError only, by type, with a bounded number of attempts."""

from __future__ import annotations

import pytest

from ckptd.errors import IntegrityError, PermanentStorageError, TransientStorageError
from ckptd.storage.retry import with_retries


async def test_retries_transient_until_success() -> None:
    calls: list[int] = []
    seen: list[int] = []

    async def fn() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TransientStorageError("503")
        return "ok"

    out = await with_retries(
        fn, attempts=5, base_delay=0.001, what="t", on_retry=lambda n, e: seen.append(n)
    )
    assert out == "ok" and len(calls) == 3 and seen == [1, 2]


async def test_gives_up_after_attempts() -> None:
    calls: list[int] = []

    async def fn() -> None:
        calls.append(1)
        raise TransientStorageError("down")

    with pytest.raises(TransientStorageError):
        await with_retries(fn, attempts=3, base_delay=0.001, what="t")
    assert len(calls) == 3


@pytest.mark.parametrize(
    "exc", [PermanentStorageError("403"), IntegrityError("crc"), FileExistsError("x")]
)
async def test_other_errors_are_not_retried(exc: Exception) -> None:
    calls: list[int] = []

    async def fn() -> None:
        calls.append(1)
        raise exc

    with pytest.raises(type(exc)):
        await with_retries(fn, attempts=5, base_delay=0.001, what="t")
    assert len(calls) == 1
