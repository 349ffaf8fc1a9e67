"""Store options (SSE-S3, SSE-KMS, storage class; GCS CMEK and class): checked at start, sent
with every write, recorded in the manifest. Against moto (which records SSE and storage class
on objects) and fake-gcs-server (which records the storage class of simple uploads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request

import boto3
import crc32c
import pytest
import torch

from ckptd import Checkpointer
from ckptd.errors import ConfigError
from ckptd.storage.gcs import GCSStore
from ckptd.storage.options import StoreOptions
from ckptd.storage.s3 import S3Store
from tests.faultproxy import FaultProxy
from tests.servers import MOTO_CAPABILITIES

MiB = 1 << 20
KEY = "projects/p/locations/global/keyRings/r/cryptoKeys/k"


@pytest.mark.parametrize(
    ("scheme", "opts", "why"),
    [
        ("s3", StoreOptions(sse="AES"), "unknown --sse"),
        ("s3", StoreOptions(kms_key="k"), "needs --sse aws:kms"),
        ("s3", StoreOptions(sse="AES256", kms_key="k"), "needs --sse aws:kms"),
        ("s3", StoreOptions(storage_class="GLACIER"), "need a restore"),
        ("s3", StoreOptions(storage_class="standard"), "unknown or unreadable"),
        ("gs", StoreOptions(sse="AES256"), "--sse is for S3"),
        ("gs", StoreOptions(kms_key="my-key"), "must be projects/"),
        ("gs", StoreOptions(storage_class="STANDARD_IA"), "unknown GCS"),
        ("file", StoreOptions(storage_class="STANDARD"), "need S3 or GCS"),
    ],
)
def test_unknown_or_unusable_options_are_refused(scheme: str, opts: StoreOptions, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        opts.check(scheme)


def test_valid_options_pass_and_nothing_is_a_no_op() -> None:
    assert StoreOptions(sse="aws:kms", kms_key="arn:k", storage_class="STANDARD_IA").check("s3")
    assert StoreOptions(kms_key=KEY, storage_class="NEARLINE").check("gs")
    assert not StoreOptions().check("file")  # no options: fine anywhere


def test_serve_refuses_bad_options_before_starting(tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = subprocess.run(
        [sys.executable, "-m", "ckptd", "serve", "--root", str(tmp_path / "r"),
         "--socket", str(tmp_path / "s"), "--store", "s3://b/p", "--storage-class", "GLACIER"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and "GLACIER" in r.stderr and "restore" in r.stderr


async def test_s3_objects_carry_sse_kms_and_class(s3_bucket: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    opts = StoreOptions(sse="aws:kms", kms_key="key-1", storage_class="STANDARD_IA")
    st = S3Store(s3_bucket, "o", part_size=5 * MiB, options=opts, capabilities=MOTO_CAPABILITIES)
    data = os.urandom(5 * MiB + 9)
    path = os.path.join(tmp_path, "w.bin")
    with open(path, "wb") as f:
        f.write(data)
    await st.put_file("big", path, size=len(data), crc32c=crc32c.crc32c(data))  # multipart
    await st.put_bytes("small", b"x")
    client = boto3.session.Session().client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for key in ("o/big", "o/small"):
        head = client.head_object(Bucket=s3_bucket, Key=key)
        assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"] == "key-1"
        assert head["StorageClass"] == "STANDARD_IA"
    await st.close()


async def test_probe_runs_with_the_options(s3_bucket: str) -> None:
    st = S3Store(s3_bucket, "o", options=StoreOptions(sse="AES256"))
    assert (await st.capabilities()).etag_is_md5  # moto: still MD5 ETags under SSE-S3
    await st.close()


async def test_gcs_objects_carry_cmek_and_class(
    gcs_proxy: FaultProxy, gcs_bucket: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    opts = StoreOptions(kms_key=KEY, storage_class="NEARLINE")
    st = GCSStore(gcs_bucket, "o", chunk_size=256 << 10, options=opts, retry_base_delay=0.01)
    await st.put_bytes("small", b"x")
    data = os.urandom(600 << 10)
    path = os.path.join(tmp_path, "w.bin")
    with open(path, "wb") as f:
        f.write(data)
    await st.put_file("big", path, size=len(data), crc32c=crc32c.crc32c(data))  # resumable
    uploads = [r for r in gcs_proxy.requests if r.startswith("POST ") and "/upload/" in r]
    assert len(uploads) == 2
    assert all(f"kmsKeyName={KEY}" in urllib.parse.unquote(r) for r in uploads), uploads
    host = os.environ["STORAGE_EMULATOR_HOST"]
    with urllib.request.urlopen(f"{host}/storage/v1/b/{gcs_bucket}/o/o%2Fsmall") as f:
        assert json.load(f)["storageClass"] == "NEARLINE"
    await st.close()


def test_daemon_applies_and_records_the_options(s3_bucket: str, make_daemon) -> None:  # type: ignore[no-untyped-def]
    store = f"s3://{s3_bucket}/opt"
    d = make_daemon(store=store, args=["--sse", "AES256", "--storage-class", "STANDARD_IA"])
    with Checkpointer("r", socket=d.socket) as ckpt:
        ckpt.save(1, model=torch.nn.Linear(8, 8)).wait("uploaded", timeout=60)
    client = boto3.session.Session().client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    key = "opt/r/checkpoints/step-00000001/MANIFEST.json"
    manifest = json.loads(client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    assert manifest["store_options"] == {"sse": "AES256", "storage_class": "STANDARD_IA"}
    assert len(manifest["attempt"]) == 32
    for name in manifest["files"]:
        head = client.head_object(Bucket=s3_bucket, Key=f"opt/r/checkpoints/step-00000001/{name}")
        assert head["ServerSideEncryption"] == "AES256" and head["StorageClass"] == "STANDARD_IA"


def test_a_store_url_sets_options_per_run_over_the_daemons() -> None:
    from ckptd.storage import open_store
    from ckptd.storage.options import url_options

    base = StoreOptions(sse="AES256")
    assert url_options("s3://b/p", base) == base
    per_run = url_options("s3://b/p?storage_class=STANDARD_IA", base)
    assert per_run == StoreOptions(sse="AES256", storage_class="STANDARD_IA")
    store = open_store("s3://b/p?sse=aws:kms&kms_key=k1", base)
    assert store.options == StoreOptions(sse="aws:kms", kms_key="k1")  # type: ignore[attr-defined]
    assert store.prefix == "p"  # type: ignore[attr-defined]
    for bad in ("s3://b/p?sse=AES256&sse=AES256", "s3://b/p?encrypt=yes", "s3://b/p?sse="):
        with pytest.raises(ConfigError):
            url_options(bad)
    with pytest.raises(ConfigError):  # checked like the daemon's own
        open_store("s3://b/p?storage_class=GLACIER")


def test_a_run_chooses_its_own_storage_class(s3_bucket: str, make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(store=f"s3://{s3_bucket}/opt", args=["--sse", "AES256"])
    run_store = f"s3://{s3_bucket}/opt?storage_class=STANDARD_IA"
    with Checkpointer("r", store=run_store, socket=d.socket) as ckpt:
        ckpt.save(1, model=torch.nn.Linear(8, 8)).wait("uploaded", timeout=60)
    client = boto3.session.Session().client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    key = "opt/r/checkpoints/step-00000001/MANIFEST.json"
    manifest = json.loads(client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    assert manifest["store_options"] == {"sse": "AES256", "storage_class": "STANDARD_IA"}
    head = client.head_object(Bucket=s3_bucket, Key=key)
    assert head["StorageClass"] == "STANDARD_IA" and head["ServerSideEncryption"] == "AES256"
