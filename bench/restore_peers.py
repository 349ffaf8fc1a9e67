"""What ckptd's restore is measured against: the store's own limit and the usual peer recipes.

* ``s3_ranged_get`` / ``gcs_ranged_get``: concurrent ranged GETs of a list of objects straight
  into preallocated memory, with no checksum, no parsing, no tensors: about the most a client can
  pull from that server on this machine (aiobotocore for S3, aiohttp for GCS).
* ``S3Peer`` / ``GcsPeer``: the peer restore (``torch.save`` file in the bucket; boto3
  ``download_file`` or gcloud-aio ``Storage.download_to_filename``, then ``torch.load``) and a
  plain uploader/cleaner for setting such files up (untimed).

Endpoints come from the environment the bench sets (``AWS_ENDPOINT_URL``,
``STORAGE_EMULATOR_HOST``), the same one ckptd's store backends read.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import urllib.parse
import urllib.request
from typing import Any

import torch

PLANS: dict[str, tuple[int | None, int]] = {
    "one GET per object": (None, 8),
    "64 MiB ranges x8": (64 << 20, 8),
}
"""Range plans of the limit, name -> (bytes per ranged GET or None for whole objects, GETs in
flight); the limit is the fastest. moto_server answers every ranged GET by reading the whole
object (moto 5: ``_handle_range_header`` slices ``key.value``), so many small ranges cost it
O(ranges x object): 8 MiB x 16 measured 19-21 MB/s on a 200 MiB object where one GET reached
80-128 MB/s. Whole objects are its best case; real S3 and fake-gcs-server prefer ranges."""


def _ranges(sizes: dict[str, int], part: int | None) -> list[tuple[str, int, int]]:
    out = []
    for key, size in sizes.items():
        step = part or max(size, 1)
        for a in range(0, max(size, 1), step):
            out.append((key, a, min(size, a + step)))
    return out


def s3_ranged_get(bucket: str, sizes: dict[str, int], plan: str) -> int:
    """GET every object of ``sizes`` (key -> bytes) by ranges, concurrently, into memory."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    part, inflight = PLANS[plan]

    async def go() -> int:
        bufs = {k: bytearray(n) for k, n in sizes.items()}
        sem = asyncio.Semaphore(inflight)
        cfg = AioConfig(max_pool_connections=inflight)
        async with get_session().create_client("s3", config=cfg) as client:

            async def one(key: str, a: int, b: int) -> None:
                if a == b:
                    return
                async with sem:
                    r = await client.get_object(Bucket=bucket, Key=key, Range=f"bytes={a}-{b - 1}")
                    view = memoryview(bufs[key])
                    async with r["Body"] as body:
                        pos = a
                        while pos < b:
                            n = await body.readinto(view[pos:b])
                            if n == 0:
                                break
                            pos += n
                    if pos != b:
                        raise OSError(f"short ranged GET of {key}: {pos - a} of {b - a} bytes")

            await asyncio.gather(*(one(*r) for r in _ranges(sizes, part)))
        return sum(len(b) for b in bufs.values())

    return asyncio.run(go())


def gcs_ranged_get(host: str, bucket: str, sizes: dict[str, int], plan: str) -> int:
    """The same from fake-gcs-server's media endpoint with plain aiohttp (what gcloud-aio
    runs on; its ``Storage.download`` returns a fresh ``bytes`` per call and measured slower)."""
    import urllib.parse

    import aiohttp

    part, inflight = PLANS[plan]

    async def go() -> int:
        bufs = {k: bytearray(n) for k, n in sizes.items()}
        sem = asyncio.Semaphore(inflight)
        conn = aiohttp.TCPConnector(limit=inflight)
        async with aiohttp.ClientSession(connector=conn) as session:

            async def one(key: str, a: int, b: int) -> None:
                if a == b:
                    return
                name = urllib.parse.quote(key, safe="")
                url = f"{host}/download/storage/v1/b/{bucket}/o/{name}?alt=media"
                async with sem, session.get(url, headers={"Range": f"bytes={a}-{b - 1}"}) as r:
                    r.raise_for_status()
                    pos = a
                    async for chunk in r.content.iter_chunked(1 << 20):
                        bufs[key][pos : pos + len(chunk)] = chunk
                        pos += len(chunk)
                if pos != b:
                    raise OSError(f"short ranged GET of {key}: {pos - a} of {b - a} bytes")

            await asyncio.gather(*(one(*r) for r in _ranges(sizes, part)))
        return sum(len(b) for b in bufs.values())

    return asyncio.run(go())


class S3Peer:
    """boto3 on one bucket: upload files (setup), ``download_file`` + ``torch.load`` (timed)."""

    def __init__(self, bucket: str) -> None:
        import boto3

        self.bucket = bucket
        self.client = boto3.client("s3")

    def upload(self, path: str, key: str) -> None:
        self.client.upload_file(path, self.bucket, key)

    def upload_dir(self, directory: str, prefix: str) -> None:
        for name in sorted(os.listdir(directory)):
            self.upload(os.path.join(directory, name), f"{prefix}/{name}")

    def download_load(self, key: str, path: str) -> Any:
        """What a peer restore does: the file to local disk (default TransferConfig), then load."""
        self.client.download_file(self.bucket, key, path)
        try:
            return torch.load(path, map_location="cpu")
        finally:
            os.unlink(path)

    def download_dir(self, prefix: str, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix + "/"
        ):
            for o in page.get("Contents", []):
                name = o["Key"][len(prefix) + 1 :]
                self.client.download_file(self.bucket, o["Key"], os.path.join(directory, name))

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError:
            return False
        return True

    def clear(self) -> None:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})


class GcsPeer:
    """gcloud-aio-storage on one bucket: upload (setup), ``download_to_filename`` + load."""

    def __init__(self, host: str, bucket: str) -> None:
        self.host, self.bucket = host, bucket

    def upload(self, path: str, key: str) -> None:
        from gcloud.aio.storage import Storage

        async def go() -> None:
            async with Storage() as storage:
                with open(path, "rb") as f:
                    await storage.upload(self.bucket, key, f, timeout=1800)

        asyncio.run(go())

    def download_load(self, key: str, path: str) -> Any:
        from gcloud.aio.storage import Storage

        async def go() -> None:
            async with Storage() as storage:
                await storage.download_to_filename(self.bucket, key, path, timeout=1800)

        asyncio.run(go())
        try:
            return torch.load(path, map_location="cpu")
        finally:
            os.unlink(path)

    def clear(self) -> None:
        with urllib.request.urlopen(f"{self.host}/storage/v1/b/{self.bucket}/o", timeout=30) as r:
            items = json.load(r).get("items", [])
        for it in items:
            name = urllib.parse.quote(it["name"], safe="")
            url = f"{self.host}/storage/v1/b/{self.bucket}/o/{name}"
            with urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=30):
                pass


def rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


__all__ = ["PLANS", "GcsPeer", "S3Peer", "gcs_ranged_get", "rmtree", "s3_ranged_get"]
