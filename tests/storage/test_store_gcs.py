"""GCSStore against fake-gcs-server, with faults injected by a proxy in front of it.

fake-gcs-server accepts any declared crc32c and finalizes a resumable session when asked for its
status (``Content-Range: bytes */TOTAL``), so here a resume after an error starts a new session;
the store detects that (a final object shorter than the file) and uploads again from zero.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator

import crc32c
import pytest

from ckptd.errors import IntegrityError, PermanentStorageError, TransientStorageError
from ckptd.storage.gcs import GCSStore
from tests.faultproxy import FaultProxy

KiB = 1 << 10
CHUNK = 256 * KiB  # GCS's chunk quantum keeps resumable tests small


def _file(tmp_path: os.PathLike[str], size: int) -> tuple[str, bytes, int]:
    data = os.urandom(size)
    path = os.path.join(tmp_path, "weights.bin")
    with open(path, "wb") as f:
        f.write(data)
    return path, data, crc32c.crc32c(data)


def _store(bucket: str, **kw: object) -> GCSStore:
    opts: dict[str, object] = {"chunk_size": CHUNK, "retry_base_delay": 0.01}
    opts.update(kw)
    return GCSStore(bucket, "runs", **opts)  # type: ignore[arg-type]


@pytest.fixture
async def gcs(gcs_bucket: str) -> AsyncIterator[GCSStore]:
    st = _store(gcs_bucket)
    yield st
    await st.close()


async def test_resumable_round_trip_in_chunks(gcs: GCSStore, tmp_path) -> None:
    path, data, crc = _file(tmp_path, 5 * CHUNK + 777)
    journal = os.path.join(tmp_path, "j.json")
    await gcs.put_file("r/w.bin", path, size=len(data), crc32c=crc, journal=journal)
    assert gcs.stats["chunks_uploaded"] == 6 and gcs.stats["sessions"] == 1
    assert not os.path.exists(journal)
    dst = os.path.join(tmp_path, "back.bin")
    await gcs.get_file("r/w.bin", dst, size=len(data))
    with open(dst, "rb") as f:
        assert f.read() == data


async def test_changed_file_never_finalizes(gcs: GCSStore, tmp_path) -> None:
    path, data, crc = _file(tmp_path, 3 * CHUNK)
    with open(path, "r+b") as f:  # the file changes after its crc went into the manifest
        f.seek(CHUNK + 1)
        f.write(bytes([data[CHUNK + 1] ^ 0xFF]))
    with pytest.raises(IntegrityError):
        await gcs.put_file("r/w.bin", path, size=len(data), crc32c=crc)
    assert await gcs.list("") == []


async def test_503s_on_chunks_are_retried(gcs_proxy: FaultProxy, gcs_bucket: str, tmp_path) -> None:
    seen: list[int] = []
    st = _store(gcs_bucket, on_retry=lambda n, e: seen.append(n))
    path, data, crc = _file(tmp_path, 4 * CHUNK + 5)
    gcs_proxy.fail_next(2, 503, match="upload_id=")
    await st.put_file("r/w.bin", path, size=len(data), crc32c=crc)
    assert gcs_proxy.injected["http_503"] == 2
    assert st.retries == 2 == len(seen)
    assert await st.get_bytes("r/w.bin") == data
    await st.close()


async def test_reset_mid_chunk_is_survived(
    gcs_proxy: FaultProxy, gcs_bucket: str, tmp_path
) -> None:
    st = _store(gcs_bucket, retry_attempts=4)
    path, data, crc = _file(tmp_path, 6 * CHUNK + 3)
    gcs_proxy.reset_next(1, match="upload_id=")
    gcs_proxy.reset_after(3 * CHUNK + 1000)
    await st.put_file("r/w.bin", path, size=len(data), crc32c=crc)
    assert gcs_proxy.injected["reset"] == 2
    assert await st.get_bytes("r/w.bin") == data
    await st.close()


async def test_journal_resume_after_restart(
    gcs_proxy: FaultProxy, gcs_bucket: str, tmp_path
) -> None:
    path, data, crc = _file(tmp_path, 6 * CHUNK + 11)
    journal = os.path.join(tmp_path, "w.journal")
    first = _store(gcs_bucket, retry_attempts=2)
    done: list[int] = []

    def progress(n: int) -> None:
        done.append(n)
        if len(done) == 3:
            gcs_proxy.down()

    with pytest.raises(TransientStorageError):
        await first.put_file(
            "r/w.bin", path, size=len(data), crc32c=crc, journal=journal, progress=progress
        )
    await first.close()
    with open(journal) as f:
        state = json.load(f)
    assert state["offset"] == 3 * CHUNK and "upload_id=" in state["session_uri"]
    gcs_proxy.up()
    second = _store(gcs_bucket)
    await second.put_file("r/w.bin", path, size=len(data), crc32c=crc, journal=journal)
    assert second.stats["uploads_resumed"] == 1
    assert not os.path.exists(journal)
    assert await second.get_bytes("r/w.bin") == data
    await second.close()


async def test_permanent_error_is_not_retried(gcs_proxy: FaultProxy, gcs_bucket: str) -> None:
    st = _store(gcs_bucket)
    gcs_proxy.fail_next(1, 403, match="POST")
    with pytest.raises(PermanentStorageError, match="403"):
        await st.put_bytes("r/x", b"x")
    assert gcs_proxy.injected["http_403"] == 1 and st.retries == 0
    await st.close()


async def test_check_access(gcs: GCSStore, gcs_bucket: str, gcs_proxy: FaultProxy) -> None:
    await gcs.check_access()
    missing = _store("no-such-bucket-here")
    with pytest.raises(PermanentStorageError, match="does not exist"):
        await missing.check_access()
    gcs_proxy.fail_next(1, 403)
    with pytest.raises(PermanentStorageError, match="access denied"):
        await missing.check_access()
    assert missing.retries == 0
    await missing.close()


async def test_requests_stream_the_file_in_pieces(gcs_bucket: str, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A request body is read piece by piece while it is sent; a change anywhere in the file
    stops the last request before the object is finalized."""
    from ckptd.storage import gcs as gcs_module

    monkeypatch.setattr(gcs_module, "_PIECE", 64 * KiB)
    st = _store(gcs_bucket, chunk_size=4 * CHUNK)  # 16 pieces per request
    try:
        path, data, crc = _file(tmp_path, 9 * CHUNK + 123)
        await st.put_file("r/w.bin", path, size=len(data), crc32c=crc)
        assert st.stats["chunks_uploaded"] == 3 and st.stats["sessions"] == 1
        assert await st.get_bytes("r/w.bin") == data
        with open(path, "r+b") as f:  # changed inside the second request's body
            f.seek(5 * CHUNK + 3)
            f.write(bytes([data[5 * CHUNK + 3] ^ 0xFF]))
        with pytest.raises(IntegrityError, match="changed during upload"):
            await st.put_file("r/changed.bin", path, size=len(data), crc32c=crc)
        assert [o.key for o in await st.list("r/")] == ["r/w.bin"]
    finally:
        await st.close()
