"""S3-compatible servers: capability probing, each fallback, and the end-to-end story.

Run against moto (the control), s3rver (a second S3 implementation, lacking ListParts,
ListMultipartUploads, Abort, create-only and any checksum check) and moto behind the fault
proxy's compatibility modes, so that every fallback meets a real server that needs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import boto3
import crc32c
import pytest
import torch

import ckptd
from ckptd import Checkpointer
from ckptd.atomic import is_temp
from ckptd.errors import AlreadyExistsError
from ckptd.storage.capabilities import COMPOSITE, FULL_OBJECT, Capabilities
from ckptd.storage.s3 import S3Store
from tests.faultproxy import FaultProxy
from tests.helpers import bitwise_equal, until
from tests.servers import MOTO_CAPABILITIES, S3RVER_CAPABILITIES

MiB = 1 << 20
PART = 5 * MiB
LISTING = ("ListParts", "ListMultipartUploads", "AbortMultipartUpload")


def _store(bucket: str, **kw: object) -> S3Store:
    opts: dict[str, object] = {"part_size": PART, "retry_base_delay": 0.01, "max_concurrency": 2}
    opts.update(kw)
    return S3Store(bucket, "compat", **opts)  # type: ignore[arg-type]


def _file(tmp_path: os.PathLike[str], size: int, name: str = "w.bin") -> tuple[str, bytes, int]:
    data = os.urandom(size)
    path = os.path.join(tmp_path, name)
    with open(path, "wb") as f:
        f.write(data)
    return path, data, crc32c.crc32c(data)


def _client() -> object:
    return boto3.session.Session().client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


@pytest.fixture
async def moto_like_s3rver(s3_proxy: FaultProxy, s3_bucket: str) -> AsyncIterator[FaultProxy]:
    """moto behind the proxy with s3rver's gaps: no listing/abort, create-only ignored."""
    s3_proxy.refuse_ops(*LISTING, status=405)
    s3_proxy.ignore_if_none_match()
    yield s3_proxy


@pytest.fixture(params=["s3rver", "moto-proxied"])
def gappy(request: pytest.FixtureRequest) -> tuple[str, FaultProxy]:
    """(bucket, proxy): a server without listing, abort and create-only, and its proxy."""
    if request.param == "s3rver":
        return request.getfixturevalue("s3rver_bucket"), request.getfixturevalue("s3rver_proxy")
    proxy = request.getfixturevalue("moto_like_s3rver")
    return request.getfixturevalue("s3_bucket"), proxy


# -- probing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "expected"),
    [("s3_bucket", MOTO_CAPABILITIES), ("s3rver_bucket", S3RVER_CAPABILITIES)],
)
async def test_probe_finds_what_each_server_does_and_cleans_up(
    request: pytest.FixtureRequest, server: str, expected: Capabilities
) -> None:
    bucket = request.getfixturevalue(server)
    st = _store(bucket)
    caps = await st.capabilities()
    assert caps == expected
    assert await st.capabilities() is caps  # probed once, cached
    assert "server-checked CRC32C (fallback: etag-md5)" in caps.summary(st.url)
    assert await st.list("") == []  # the probe objects are gone
    await st.close()


async def test_probe_sees_the_proxy_modes(s3_proxy: FaultProxy, s3_bucket: str) -> None:
    s3_proxy.refuse_ops(*LISTING, status=501)
    s3_proxy.ignore_if_none_match()
    s3_proxy.refuse_header("x-amz-checksum-type", FULL_OBJECT)
    st = _store(s3_bucket)
    caps = await st.capabilities()
    assert not (caps.list_parts or caps.list_uploads or caps.abort_uploads or caps.create_only)
    assert caps.multipart_checksum == COMPOSITE
    assert s3_proxy.injected["if_none_match_dropped"] >= 1
    await st.close()


async def test_stripped_checksums_are_not_trusted(
    s3_proxy: FaultProxy, s3_bucket: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    s3_proxy.strip_checksums()
    st = _store(s3_bucket)
    caps = await st.capabilities()
    assert not caps.reports_checksums and caps.integrity == "etag-md5"
    assert s3_proxy.injected["checksums_stripped"] >= 1
    path, data, crc = _file(tmp_path, 2 * PART + 7)
    await st.put_file("r/w.bin", path, size=len(data), crc32c=crc)  # no CRC reported: ETags
    assert await st.get_bytes("r/w.bin") == data
    await st.close()


# -- fallbacks ---------------------------------------------------------------------------------


async def test_create_only_without_if_none_match(gappy: tuple[str, FaultProxy]) -> None:
    bucket, _ = gappy
    one, two = _store(bucket), _store(bucket)
    assert not (await one.capabilities()).create_only
    await one.put_bytes("r/ck/MANIFEST.json", b'{"attempt": "a"}', if_absent=True)
    await one.put_bytes("r/ck/MANIFEST.json", b'{"attempt": "a"}', if_absent=True)  # our own
    with pytest.raises(AlreadyExistsError):
        await two.put_bytes("r/ck/MANIFEST.json", b'{"attempt": "b"}', if_absent=True)
    assert await one.get_bytes("r/ck/MANIFEST.json") == b'{"attempt": "a"}'
    await one.close()
    await two.close()


async def test_resume_from_the_journal_without_list_parts(
    gappy: tuple[str, FaultProxy], tmp_path
) -> None:  # type: ignore[no-untyped-def]
    bucket, proxy = gappy
    path, data, crc = _file(tmp_path, 4 * PART + 321)
    journal = os.path.join(tmp_path, "w.journal")
    first = _store(bucket, max_concurrency=1, retry_attempts=2)
    await first.capabilities()
    done: list[int] = []

    def progress(n: int) -> None:
        done.append(n)
        if len(done) == 2:
            proxy.down()  # the network dies after two parts

    with pytest.raises(ckptd.errors.TransientStorageError):
        await first.put_file(
            "r/w.bin", path, size=len(data), crc32c=crc, journal=journal, progress=progress
        )
    await first.close()
    with open(journal) as f:
        assert sorted(json.load(f)["parts"]) == ["1", "2"]
    proxy.up()
    n_before = len(proxy.calls)
    second = _store(bucket)
    await second.put_file("r/w.bin", path, size=len(data), crc32c=crc, journal=journal)
    after = proxy.calls[n_before:]
    assert second.stats["parts_resumed"] == 2 and second.stats["parts_uploaded"] == 3
    # Known to be missing (the probe asked, under .ckptd/): never asked for the upload itself.
    assert not any(c.op == "ListParts" and "/.ckptd/" not in c.path for c in after)
    assert not os.path.exists(journal)
    assert await second.get_bytes("r/w.bin") == data
    await second.close()


async def test_unresumable_journal_starts_a_fresh_upload(
    gappy: tuple[str, FaultProxy], tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """The journal names an upload the server does not know: a fresh upload, never a failure."""
    bucket, _ = gappy
    path, data, crc = _file(tmp_path, 2 * PART + 5)
    st = _store(bucket, retry_attempts=2)
    journal = os.path.join(tmp_path, "j.json")
    gone = {"backend": "s3", "bucket": bucket, "key": "compat/r/w.bin", "size": len(data),
            "crc32c": crc, "part_size": PART, "upload_id": "no-such-upload",
            "checksum_type": FULL_OBJECT,
            "parts": {"1": {"etag": '"0123"', "crc32c": 1, "size": PART}}}  # fmt: skip
    with open(journal, "w") as f:
        json.dump(gone, f)
    await st.put_file("r/w.bin", path, size=len(data), crc32c=crc, journal=journal)
    assert await st.get_bytes("r/w.bin") == data
    assert not os.path.exists(journal)
    await st.close()


async def test_gc_listing_unsupported_is_a_warning(gappy: tuple[str, FaultProxy]) -> None:
    bucket, _ = gappy
    st = _store(bucket)
    assert await st.abort_stale_uploads("r/", older_than_s=0) == 0
    await st.close()


async def test_listing_refused_after_the_probe_is_a_warning_too(
    s3_proxy: FaultProxy, s3_bucket: str
) -> None:
    st = _store(s3_bucket)
    assert (await st.capabilities()).list_uploads
    s3_proxy.refuse_ops("ListMultipartUploads", status=405)
    assert await st.abort_stale_uploads("r/", older_than_s=0) == 0
    await st.close()


async def test_composite_where_full_object_is_refused(
    s3_proxy: FaultProxy, s3_bucket: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    s3_proxy.refuse_header("x-amz-checksum-type", FULL_OBJECT)
    st = _store(s3_bucket)
    path, data, crc = _file(tmp_path, 2 * PART + 11)
    await st.put_file("r/w.bin", path, size=len(data), crc32c=crc)
    head = _client().head_object(Bucket=s3_bucket, Key="compat/r/w.bin", ChecksumMode="ENABLED")  # type: ignore[attr-defined]
    assert head.get("ChecksumType") == COMPOSITE
    assert await st.get_bytes("r/w.bin") == data
    await st.close()


@pytest.mark.parametrize("size", [1000, 2 * PART + 3])
async def test_read_back_where_nothing_is_checked(any_s3_bucket: str, tmp_path, size: int) -> None:  # type: ignore[no-untyped-def]
    """A server with no checksum, no MD5 check and no MD5 ETag: every object is read back."""
    nothing = Capabilities(verifies_checksums=False, reports_checksums=False,
                           verifies_md5=False, etag_is_md5=False)  # fmt: skip
    st = _store(any_s3_bucket, capabilities=nothing)
    assert nothing.integrity == "read-back"
    path, data, crc = _file(tmp_path, size)
    await st.put_file("r/w.bin", path, size=size, crc32c=crc)
    await st.put_bytes("r/small", b"abc")
    assert st.stats["read_back_bytes"] == size + 3
    assert await st.get_bytes("r/w.bin") == data
    await st.close()


async def test_botocore_checksum_setting_is_respected(
    any_s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    st = _store(any_s3_bucket)
    caps = await st.capabilities()
    assert not caps.sends_checksums and caps.integrity == "etag-md5"
    path, data, crc = _file(tmp_path, 2 * PART + 1)
    await st.put_file("r/w.bin", path, size=len(data), crc32c=crc)
    assert await st.get_bytes("r/w.bin") == data
    await st.close()


async def test_http_proxy_convention_is_followed(
    s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``HTTP_PROXY`` reaches the store's requests (botocore's convention, untouched)."""
    port = int(s3_server.rsplit(":", 1)[1])
    with FaultProxy("127.0.0.1", port) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        for var in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(var, raising=False)
        st = _store(s3_bucket, capabilities=MOTO_CAPABILITIES)
        await st.put_bytes("r/x", b"x")
        assert await st.get_bytes("r/x") == b"x"
        await st.close()
    assert any(r.startswith(f"PUT {s3_server}/{s3_bucket}/compat/r/x ") for r in proxy.requests)


# -- the end-to-end story ----------------------------------------------------------------------


def _ckptd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptd", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(params=["moto", "s3rver"])
def story(request: pytest.FixtureRequest) -> tuple[str, FaultProxy, str]:
    """(bucket, proxy in front of it, server name) on each S3 implementation."""
    if request.param == "moto":
        bucket, proxy = request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_proxy")
    else:
        bucket = request.getfixturevalue("s3rver_bucket")
        proxy = request.getfixturevalue("s3rver_proxy")
    return bucket, proxy, str(request.param)


@pytest.mark.slow
def test_the_story_on_each_server(story: tuple[str, FaultProxy, str], make_daemon) -> None:  # type: ignore[no-untyped-def]
    """Save, SIGKILL mid-upload, resume, drain, verify, load, gc, a second writer refused."""
    bucket, proxy, server = story
    store = f"s3://{bucket}/story"
    d = make_daemon(store=store, args=["--file-concurrency", "1"])
    torch.manual_seed(7)
    big = {"w": torch.randn(5 << 20 >> 2), "v": torch.randn(15 << 20 >> 2)}  # 20 MiB: 3 parts
    proxy.limit_bandwidth(4 << 20)
    jdir = os.path.join(d.root, ".ckptd", "journal", "story", "step-00000001")

    def finished_parts() -> set[str]:
        parts: set[str] = set()
        for name in os.listdir(jdir) if os.path.isdir(jdir) else []:
            if is_temp(name):
                continue
            try:
                with open(os.path.join(jdir, name)) as f:
                    parts |= set(json.load(f).get("parts", {}))
            except (OSError, ValueError):
                continue
        return parts

    with Checkpointer("story", socket=d.socket) as ckpt:
        ckpt.save(1, model=big).wait("committed", timeout=60)
        until(lambda: len(finished_parts()) >= 1, 120, "a first part to finish")
    d.kill()
    done_before = finished_parts()
    n_before = len(proxy.requests)
    proxy.limit_bandwidth(None)
    d.start()
    with Checkpointer("story", socket=d.socket) as ckpt:
        assert ckpt._conn.request({"op": "drain", "timeout": 120}, timeout=180)["ok"]  # type: ignore[union-attr]
        caps = ckpt.status()["store_capabilities"][store]
        assert caps["create_only"] == caps["list_parts"] == (server == "moto")
        # One log line per store at start, naming each gap and its fallback.
        line = [x for x in d.log_text().splitlines() if f"store {store}: " in x][-1]
        assert ("ListParts (fallback" in line) == (server == "s3rver"), line
        ckpt.save(2, model={"w": torch.ones(4)}).wait("uploaded", timeout=60)
    resent = {
        r.split("partNumber=")[1].split("&")[0].split()[0]
        for r in proxy.requests[n_before:]
        if "partNumber=" in r and "/.ckptd/" not in r  # not the capability probe's own part
    }
    assert not resent & done_before, f"finished parts sent again: {sorted(resent & done_before)}"
    assert bitwise_equal(ckptd.load(f"{store}/story", tag="step-00000001")["model"], big)
    v = _ckptd("verify", f"{store}/story@step-00000001")
    assert v.returncode == 0, v.stderr
    # A second node saving the same run@tag is refused; the first one's checkpoint stays.
    other = make_daemon(store=store, name="other")
    with Checkpointer("story", socket=other.socket) as ckpt:
        h = ckpt.save(1, model={"w": torch.zeros(4)})
        with pytest.raises(ckptd.SaveError, match="already exists"):
            h.wait("uploaded", timeout=60)
    assert bitwise_equal(ckptd.load(f"{store}/story", tag="step-00000001")["model"], big)
    gc = _ckptd("gc", store, "--keep-last", "1")
    assert gc.returncode == 0, gc.stderr
    assert [m["step"] for m in ckptd.list_checkpoints(f"{store}/story")] == [2]


def test_integrity_modes_strongest_first_and_gaps_named() -> None:
    assert Capabilities().integrity == "crc32c" and Capabilities().missing() == []
    no_crc = Capabilities(verifies_checksums=False)
    assert no_crc.integrity == "md5"
    assert Capabilities(verifies_checksums=True, sends_checksums=False).integrity == "md5"
    reported = Capabilities(verifies_checksums=False, verifies_md5=False, reports_checksums=True)
    assert reported.integrity == "read-back"  # a reported CRC alone is not a write-time check
    etag = Capabilities(verifies_checksums=False, verifies_md5=False, reports_checksums=False,
                        etag_is_md5=True)  # fmt: skip
    assert etag.integrity == "etag-md5"
    gaps = S3RVER_CAPABILITIES.missing()
    assert len(gaps) == 5 and all("fallback" in g for g in gaps)
    assert S3RVER_CAPABILITIES.as_dict()["integrity"] == "etag-md5"
