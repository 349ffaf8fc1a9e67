"""S3Store against moto_server, with faults injected by a proxy in front of it."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator

import boto3
import crc32c
import pytest

from ckptd.errors import (
    CredentialsError,
    IntegrityError,
    PermanentStorageError,
    TransientStorageError,
)
from ckptd.storage.base import crc32c_combine
from ckptd.storage.s3 import NO_CREDENTIALS, S3Store
from tests.faultproxy import FaultProxy
from tests.servers import MOTO_CAPABILITIES

MiB = 1 << 20
PART = 5 * MiB  # S3's minimum part size keeps multipart tests small


def _file(tmp_path: os.PathLike[str], size: int) -> tuple[str, bytes, int]:
    data = os.urandom(size)
    path = os.path.join(tmp_path, "weights.bin")
    with open(path, "wb") as f:
        f.write(data)
    return path, data, crc32c.crc32c(data)


def _store(bucket: str, **kw: object) -> S3Store:
    opts: dict[str, object] = {"part_size": PART, "retry_base_delay": 0.01, "max_concurrency": 3}
    opts["capabilities"] = MOTO_CAPABILITIES  # probed in test_s3_compat; no probe under faults
    opts.update(kw)
    return S3Store(bucket, "runs", **opts)  # type: ignore[arg-type]


@pytest.fixture
async def s3(s3_bucket: str) -> AsyncIterator[S3Store]:
    st = _store(s3_bucket)
    yield st
    await st.close()


def _pending_uploads(bucket: str) -> list[dict[str, object]]:
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    return list(client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def test_crc32c_combine() -> None:
    a, b = os.urandom(1234), os.urandom(4321)
    assert crc32c_combine(crc32c.crc32c(a), crc32c.crc32c(b), len(b)) == crc32c.crc32c(a + b)
    assert crc32c_combine(crc32c.crc32c(a), 0, 0) == crc32c.crc32c(a)


def test_part_size_grows_to_fit_10000_parts() -> None:
    st = S3Store("b", part_size=8 * MiB)
    assert st.part_size_for(10 * MiB) == 8 * MiB
    assert st.part_size_for(200_000 * MiB) == 256 * MiB  # big files in big parts (parts.py)
    assert st.part_size_for(4 << 40) == 420 * MiB  # 4 TiB: grown past 256 MiB to fit


async def test_multipart_stores_full_object_crc32c(s3: S3Store, s3_bucket: str, tmp_path) -> None:
    path, data, crc = _file(tmp_path, 3 * PART + 1234)
    await s3.put_file("r/w.bin", path, size=len(data), crc32c=crc)
    assert s3.stats["parts_uploaded"] == 4
    head = boto3.client("s3").head_object(
        Bucket=s3_bucket, Key="runs/r/w.bin", ChecksumMode="ENABLED"
    )
    assert head["ChecksumCRC32C"] == crc.to_bytes(4, "big").hex() or head["ChecksumType"]
    assert await s3.get_bytes("r/w.bin") == data
    assert _pending_uploads(s3_bucket) == []


async def test_changed_file_aborts_multipart(s3: S3Store, s3_bucket: str, tmp_path) -> None:
    path, data, crc = _file(tmp_path, 2 * PART + 10)
    with open(path, "r+b") as f:  # the file changes after its crc went into the manifest
        f.seek(PART + 5)
        f.write(bytes([data[PART + 5] ^ 0xFF]))
    journal = os.path.join(tmp_path, "j.json")
    with pytest.raises(IntegrityError):
        await s3.put_file("r/w.bin", path, size=len(data), crc32c=crc, journal=journal)
    assert await s3.list("") == []
    assert _pending_uploads(s3_bucket) == []
    assert not os.path.exists(journal)


async def test_503s_on_parts_are_retried_and_counted(
    s3_proxy: FaultProxy, s3_bucket: str, tmp_path
) -> None:
    seen: list[tuple[int, BaseException]] = []
    st = _store(s3_bucket, on_retry=lambda n, e: seen.append((n, e)))
    path, data, crc = _file(tmp_path, 2 * PART + 99)
    s3_proxy.fail_next(3, 503, match="partNumber=")
    await st.put_file("r/w.bin", path, size=len(data), crc32c=crc)
    assert s3_proxy.injected["http_503"] == 3
    assert st.retries == 3 and len(seen) == 3
    assert all(isinstance(e, TransientStorageError) for _, e in seen)
    assert await st.get_bytes("r/w.bin") == data
    await st.close()


async def test_reset_mid_upload_is_survived(s3_proxy: FaultProxy, s3_bucket: str, tmp_path) -> None:
    st = _store(s3_bucket)
    path, data, crc = _file(tmp_path, 3 * PART)
    s3_proxy.reset_after(7 * MiB)
    await st.put_file("r/w.bin", path, size=len(data), crc32c=crc)
    assert s3_proxy.injected["reset"] == 1
    # The cut part went again: by our retry, or by aiohttp's own single retry of an idempotent
    # request (PUT) whose reused keep-alive connection dropped.
    parts = [r.split("partNumber=")[1].split()[0] for r in s3_proxy.requests if "partNumber=" in r]
    assert len(parts) == 4 and sorted(set(parts)) == ["1", "2", "3"]
    dst = os.path.join(tmp_path, "back.bin")
    await st.get_file("r/w.bin", dst)
    with open(dst, "rb") as f:
        assert f.read() == data
    await st.close()


async def test_stalled_response_times_out_and_retries(s3_proxy: FaultProxy, s3_bucket: str) -> None:
    st = _store(s3_bucket, read_timeout=0.5)
    await st.put_bytes("r/small", b"abc")
    s3_proxy.stall(3.0)
    assert await st.get_bytes("r/small") == b"abc"
    assert s3_proxy.injected["stall"] == 1 and st.retries >= 1
    await st.close()


async def test_permanent_error_is_not_retried(s3_proxy: FaultProxy, s3_bucket: str) -> None:
    st = _store(s3_bucket)
    s3_proxy.fail_next(1, 403, match="PUT")
    with pytest.raises(PermanentStorageError, match="AccessDenied"):
        await st.put_bytes("r/x", b"x")
    assert s3_proxy.injected["http_403"] == 1 and st.retries == 0
    await st.close()


async def test_retries_give_up_when_server_stays_down(s3_proxy: FaultProxy, s3_bucket: str) -> None:
    st = _store(s3_bucket, retry_attempts=3)
    s3_proxy.down()
    with pytest.raises(TransientStorageError):
        await st.put_bytes("r/x", b"x")
    assert st.retries == 2 and s3_proxy.injected["refused"] >= 3
    await st.close()


async def test_journal_resume_uses_list_parts(
    s3_proxy: FaultProxy, s3_bucket: str, tmp_path
) -> None:
    path, data, crc = _file(tmp_path, 4 * PART + 321)
    journal = os.path.join(tmp_path, "w.journal")
    first = _store(s3_bucket, max_concurrency=1, retry_attempts=2)
    done: list[int] = []

    def progress(n: int) -> None:
        done.append(n)
        if len(done) == 2:
            s3_proxy.down()  # the network dies after two parts

    with pytest.raises(TransientStorageError):
        await first.put_file(
            "r/w.bin", path, size=len(data), crc32c=crc, journal=journal, progress=progress
        )
    await first.close()
    with open(journal) as f:
        state = json.load(f)
    assert sorted(state["parts"]) == ["1", "2"]
    s3_proxy.up()
    sent_before = [r for r in s3_proxy.requests if "partNumber=" in r]

    second = _store(s3_bucket)  # a restarted daemon
    await second.put_file("r/w.bin", path, size=len(data), crc32c=crc, journal=journal)
    assert second.stats["uploads_resumed"] == 1 and second.stats["parts_resumed"] == 2
    assert second.stats["parts_uploaded"] == 3
    new = s3_proxy.requests[s3_proxy.requests.index(sent_before[-1]) + 1 :]
    assert any(r.startswith("GET ") and "uploadId=" in r for r in new)  # ListParts
    resent = [r for r in new if "partNumber=1&" in r or "partNumber=2&" in r]
    assert resent == []
    assert not os.path.exists(journal)
    assert await second.get_bytes("r/w.bin") == data
    assert _pending_uploads(s3_bucket) == []
    await second.close()


async def test_unresumable_journal_is_aborted(s3: S3Store, s3_bucket: str, tmp_path) -> None:
    path, data, crc = _file(tmp_path, PART + 1)
    client = boto3.client("s3")
    old = client.create_multipart_upload(Bucket=s3_bucket, Key="runs/r/old.bin")["UploadId"]
    journal = os.path.join(tmp_path, "j.json")
    with open(journal, "w") as f:
        json.dump({"backend": "s3", "bucket": s3_bucket, "key": "runs/r/old.bin", "size": 1,
                   "crc32c": 0, "part_size": PART, "upload_id": old, "parts": {}}, f)  # fmt: skip
    await s3.put_file("r/w.bin", path, size=len(data), crc32c=crc, journal=journal)
    assert _pending_uploads(s3_bucket) == []
    assert await s3.get_bytes("r/w.bin") == data


async def test_abort_stale_uploads(s3: S3Store, s3_bucket: str) -> None:
    client = boto3.client("s3")
    client.create_multipart_upload(Bucket=s3_bucket, Key="runs/r/ck/a.bin")
    client.create_multipart_upload(Bucket=s3_bucket, Key="other/b.bin")
    # moto reports every upload as initiated in 2010, so "not stale yet" cannot be shown here.
    assert await s3.abort_stale_uploads("r/", older_than_s=0) == 1
    assert [u["Key"] for u in _pending_uploads(s3_bucket)] == ["other/b.bin"]


async def test_check_access(s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    ok = _store(s3_bucket)
    await ok.check_access()
    await ok.close()
    missing = _store("no-such-bucket-here")
    with pytest.raises(PermanentStorageError, match="does not exist"):
        await missing.check_access()
    await missing.close()
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.path.join(tmp_path, "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", os.path.join(tmp_path, "none"))
    nocreds = _store(s3_bucket)
    with pytest.raises(CredentialsError) as info:
        await nocreds.check_access()
    assert str(info.value) == NO_CREDENTIALS
    await nocreds.close()


async def test_check_access_denied(s3_proxy: FaultProxy, s3_bucket: str) -> None:
    st = _store(s3_bucket)
    s3_proxy.fail_next(1, 403)  # moto accepts any key; the proxy plays the denying server
    with pytest.raises(PermanentStorageError, match="access denied"):
        await st.check_access()
    assert st.retries == 0
    await st.close()
