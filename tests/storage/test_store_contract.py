"""The Store contract, run against every backend: memory, local, S3 (moto and s3rver), GCS
(fake-gcs)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import crc32c
import pytest

from ckptd.errors import IntegrityError, NotFoundError
from ckptd.storage import Store, open_store
from ckptd.storage.gcs import GCSStore
from ckptd.storage.local import LocalStore
from ckptd.storage.memory import MemoryStore
from ckptd.storage.s3 import S3Store

MiB = 1 << 20


@pytest.fixture(params=["memory", "local", "s3", "s3rver", "gcs"])
async def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Store]:
    kind = request.param
    if kind == "memory":
        st: Store = MemoryStore(f"memory://{request.node.name}")
    elif kind == "local":
        st = LocalStore(str(tmp_path_factory.mktemp("store")))
    elif kind in ("s3", "s3rver"):
        bucket = request.getfixturevalue("s3_bucket" if kind == "s3" else "s3rver_bucket")
        st = S3Store(bucket, "pre/fix", part_size=5 * MiB, retry_base_delay=0.01)
    else:
        bucket = request.getfixturevalue("gcs_bucket")
        st = GCSStore(bucket, "pre/fix", chunk_size=256 << 10, retry_base_delay=0.01)
    yield st
    await st.close()
    if kind == "memory":
        MemoryStore.clear(request.node.name)


def _write(path: str, data: bytes) -> int:
    with open(path, "wb") as f:
        f.write(data)
    return crc32c.crc32c(data)


@pytest.mark.parametrize("size", [0, 1000, 6 * MiB + 12345])
async def test_put_file_round_trip(store: Store, tmp_path: os.PathLike[str], size: int) -> None:
    data = os.urandom(size)
    src = os.path.join(tmp_path, "src.bin")
    crc = _write(src, data)
    seen: list[int] = []
    await store.put_file("run/ck/a.bin", src, size=size, crc32c=crc, progress=seen.append)
    assert sum(seen) == size or (size == 0 and sum(seen) == 0)
    dst = os.path.join(tmp_path, "dst.bin")
    await store.get_file("run/ck/a.bin", dst, size=size)
    with open(dst, "rb") as f:
        assert f.read() == data
    assert await store.get_bytes("run/ck/a.bin") == data
    if size:
        assert await store.get_bytes("run/ck/a.bin", start=3, end=size // 2) == data[3 : size // 2]
        assert await store.get_bytes("run/ck/a.bin", start=size - 5) == data[-5:]


async def test_changed_file_is_not_uploaded(store: Store, tmp_path: os.PathLike[str]) -> None:
    data = bytearray(os.urandom(6 * MiB + 7))
    src = os.path.join(tmp_path, "src.bin")
    crc = _write(src, bytes(data))
    data[3 * MiB] ^= 0xFF  # the file changes after its checksum went into the manifest
    _write(src, bytes(data))
    with pytest.raises(IntegrityError):
        await store.put_file("run/ck/a.bin", src, size=len(data), crc32c=crc)
    assert await store.list("run/") == []


async def test_put_bytes_create_only_list_delete(store: Store) -> None:
    await store.put_bytes("run/latest", b"one")
    await store.put_bytes("run/latest", b"two")
    assert await store.get_bytes("run/latest") == b"two"
    await store.put_bytes("run/ck/MANIFEST.json", b"{}", if_absent=True)
    with pytest.raises(FileExistsError):
        await store.put_bytes("run/ck/MANIFEST.json", b"{1}", if_absent=True)
    assert await store.get_bytes("run/ck/MANIFEST.json") == b"{}"
    await store.put_bytes("run2/x", b"x")
    assert [(o.key, o.size) for o in await store.list("run/")] == [
        ("run/ck/MANIFEST.json", 2),
        ("run/latest", 3),
    ]
    assert [o.key for o in await store.list("")] == [
        "run/ck/MANIFEST.json",
        "run/latest",
        "run2/x",
    ]
    await store.delete("run/latest")
    await store.delete("run/latest")  # missing: not an error
    with pytest.raises(NotFoundError):
        await store.get_bytes("run/latest")
    assert [o.key for o in await store.list("run/")] == ["run/ck/MANIFEST.json"]


async def test_missing_object(store: Store, tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(NotFoundError):
        await store.get_bytes("nope")
    with pytest.raises(NotFoundError):
        await store.get_file("nope", os.path.join(tmp_path, "x"))
    assert not os.path.exists(os.path.join(tmp_path, "x"))


def test_open_store_builds_backends_without_io() -> None:
    s3 = open_store("s3://bucket/some/prefix")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    gcs = open_store("gs://bucket/p")
    assert isinstance(gcs, GCSStore) and (gcs.bucket, gcs.prefix) == ("bucket", "p")
    assert isinstance(open_store("memory://x"), MemoryStore)
