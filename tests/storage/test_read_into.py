"""``Store.read_into`` on every backend: bytes land in the caller's buffer, the returned CRC32C
is the CRC32C of those bytes, and a short or replaced object is an ``IntegrityError``."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import crc32c
import pytest

from ckptd.errors import IntegrityError, NotFoundError
from ckptd.storage import Store
from ckptd.storage.base import combine_crcs, part_spans
from ckptd.storage.gcs import GCSStore
from ckptd.storage.local import LocalStore
from ckptd.storage.memory import MemoryStore
from ckptd.storage.s3 import S3Store

MiB = 1 << 20


@pytest.fixture(params=["memory", "local", "s3", "gcs"])
async def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Store]:
    kind = request.param
    if kind == "memory":
        st: Store = MemoryStore(f"memory://{request.node.name}")
    elif kind == "local":
        st = LocalStore(str(tmp_path_factory.mktemp("store")))
    elif kind == "s3":
        st = S3Store(request.getfixturevalue("s3_bucket"), "pre", retry_base_delay=0.01)
    else:
        st = GCSStore(request.getfixturevalue("gcs_bucket"), "pre", retry_base_delay=0.01)
    yield st
    await st.close()
    if kind == "memory":
        MemoryStore.clear(request.node.name)


def test_crc_of_parts_combines_to_the_whole() -> None:
    data = os.urandom(10_001)
    spans = part_spans(len(data), 777)
    assert spans[0] == (0, 777) and spans[-1][1] == len(data)
    crcs = [(crc32c.crc32c(data[a:b]), b - a) for a, b in spans]
    assert combine_crcs(crcs) == crc32c.crc32c(data)


@pytest.mark.parametrize("size", [1, 1000, 3 * MiB + 12345])
async def test_read_into_round_trip(store: Store, size: int) -> None:
    data = os.urandom(size)
    await store.put_bytes("run/ck/a.bin", data)
    buf = bytearray(size)
    seen: list[int] = []
    crc = await store.read_into(
        "run/ck/a.bin", memoryview(buf), total=size, part_size=MiB, concurrency=3,
        progress=seen.append,
    )  # fmt: skip
    assert bytes(buf) == data
    assert crc == crc32c.crc32c(data)
    assert sum(seen) == size
    # A slice from an offset: only those bytes, and their CRC.
    part = bytearray(size // 2)
    crc = await store.read_into("run/ck/a.bin", memoryview(part), offset=size - len(part))
    assert bytes(part) == data[size - len(part) :]
    assert crc == crc32c.crc32c(part)


async def test_short_or_longer_object_is_an_integrity_error(store: Store) -> None:
    data = os.urandom(2 * MiB + 5)
    await store.put_bytes("run/ck/a.bin", data[: MiB + 3])  # truncated
    buf = bytearray(len(data))
    with pytest.raises(IntegrityError):
        await store.read_into("run/ck/a.bin", memoryview(buf), total=len(data), part_size=MiB)
    with pytest.raises(IntegrityError):  # no total: still, the object ends early
        await store.read_into("run/ck/a.bin", memoryview(buf), part_size=MiB)
    await store.put_bytes("run/ck/a.bin", data + b"x")  # replaced by a longer one
    with pytest.raises(IntegrityError):
        await store.read_into("run/ck/a.bin", memoryview(buf), total=len(data), part_size=MiB)


async def test_corrupt_byte_changes_the_crc(store: Store) -> None:
    data = bytearray(os.urandom(2 * MiB))
    want = crc32c.crc32c(data)
    data[MiB + 17] ^= 0x01
    await store.put_bytes("run/ck/a.bin", bytes(data))
    buf = bytearray(len(data))
    got = await store.read_into("run/ck/a.bin", memoryview(buf), total=len(data), part_size=MiB)
    assert got != want and got == crc32c.crc32c(data)


async def test_missing_object_is_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError):
        await store.read_into("run/ck/none.bin", memoryview(bytearray(10)), total=10)
