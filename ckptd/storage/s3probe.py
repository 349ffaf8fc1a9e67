"""Probe what an S3-compatible server really does, with a few small requests, once per store.

Every probe object lives under ``<prefix>/.ckptd/probe-<random>/`` and is deleted afterwards
(a server without AbortMultipartUpload keeps the one unfinished probe upload's parts). A refusal
of the probe request itself (4xx, 501) means "not supported"; a transient failure (5xx, a cut
connection) is retried a few times, then the probe gives up with ``TransientStorageError``, so
that a flaky start never records a missing feature that is in fact there.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import hashlib
import logging
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import crc32c as _crc32c
from botocore.exceptions import BotoCoreError, ClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from ..errors import (
    AccessDeniedError,
    BucketMissingError,
    PermanentStorageError,
    StoreUnreachableError,
    TransientStorageError,
)
from .capabilities import COMPOSITE, FULL_OBJECT, NO_CHECKSUM, PROBE_DIR, Capabilities

log = logging.getLogger(__name__)

ATTEMPTS = 4
_DATA = b"ckptd capability probe\n"


def b64crc(value: int) -> str:
    return base64.b64encode(value.to_bytes(4, "big")).decode("ascii")


def b64md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


_ON_RETRY: contextvars.ContextVar[Callable[[int, BaseException], None] | None]
_ON_RETRY = contextvars.ContextVar("probe_on_retry", default=None)


class _Refused(Exception):
    """The server answered the probe request with a refusal (4xx or 501)."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(f"{status} {code}")
        self.status, self.code = status, code


async def _ask(client: Any, op: str, **kw: Any) -> dict[str, Any]:
    """One probe request: its reply, ``_Refused`` on a refusal, retried when transient (each
    retry reported to the store's ``on_retry``, as its own requests' are)."""
    on_retry = _ON_RETRY.get()
    delay = 0.05
    for attempt in range(ATTEMPTS):
        try:
            return dict(await getattr(client, op)(**kw))
        except ClientError as e:
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            code = str(e.response.get("Error", {}).get("Code", ""))
            if status < 500 or status == 501 or code in ("NotImplemented", "MethodNotAllowed"):
                raise _Refused(status, code) from e
            err: BaseException = e
        except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as e:
            err = e
        if attempt == ATTEMPTS - 1:
            unreachable = isinstance(err, aiohttp.ClientConnectionError | ConnectionError
                                     | BotoConnectionError | TimeoutError)  # fmt: skip
            kind = StoreUnreachableError if unreachable else TransientStorageError
            raise kind(f"probing S3 ({op}): {type(err).__name__}: {err}") from err
        if on_retry is not None:
            on_retry(attempt + 1, err)
        await asyncio.sleep(delay)  # backoff between probe attempts
        delay *= 4
    raise AssertionError("unreachable")


async def _refused(client: Any, op: str, **kw: Any) -> bool:
    """Whether the server refuses this request (it is sent, retried when transient)."""
    try:
        await _ask(client, op, **kw)
    except _Refused:
        return True
    return False


async def probe_s3(
    client: Any,
    bucket: str,
    prefix: str,
    put_args: dict[str, str],
    send_checksums: bool,
    on_retry: Callable[[int, BaseException], None] | None = None,
) -> Capabilities:
    """What the server behind ``client`` does for ``bucket``; ``put_args`` are the store options
    (SSE, storage class) every write carries, so the probe sees what real writes will see."""
    token = _ON_RETRY.set(on_retry)
    try:
        return await _probe(client, bucket, prefix, put_args, send_checksums)
    finally:
        _ON_RETRY.reset(token)


async def _probe(
    client: Any, bucket: str, prefix: str, put_args: dict[str, str], send_checksums: bool
) -> Capabilities:
    base = f"{prefix}/" if prefix else ""
    root = f"{base}{PROBE_DIR}/probe-{uuid.uuid4().hex[:12]}"
    obj, mpu, spare = f"{root}/object", f"{root}/multipart", f"{root}/unfinished"
    crc, md5_hex = _crc32c.crc32c(_DATA), hashlib.md5(_DATA).hexdigest()
    put = {"Bucket": bucket, "Key": obj, "Body": _DATA, **put_args}
    try:
        # 1. A wrong CRC32C: refused by a server that checks; what it then reports tells
        #    "computes the CRC of the bytes" (the true one) from "echoes what it was told".
        wrong = {**put, "ChecksumAlgorithm": "CRC32C", "ChecksumCRC32C": b64crc(crc ^ 0xFFFF)}
        verifies = await _refused(client, "put_object", **wrong)
        reports = False
        if not verifies:
            head = await _ask(client, "head_object", Bucket=bucket, Key=obj, ChecksumMode="ENABLED")
            reports = head.get("ChecksumCRC32C") == b64crc(crc)
        # 2. A wrong Content-MD5, then the object with the right one: is its ETag our MD5?
        bad_md5 = {**put, "ContentMD5": b64md5(b"not the body")}
        verifies_md5 = await _refused(client, "put_object", **bad_md5)
        good = {**put, "ContentMD5": b64md5(_DATA)}
        if verifies:
            good |= {"ChecksumAlgorithm": "CRC32C", "ChecksumCRC32C": b64crc(crc)}
        right = await _ask(client, "put_object", **good)
        etag_is_md5 = str(right.get("ETag", "")).strip('"') == md5_hex
        if verifies:
            head = await _ask(client, "head_object", Bucket=bucket, Key=obj, ChecksumMode="ENABLED")
            reports = head.get("ChecksumCRC32C") == b64crc(crc)
        # 3. Create-only on a key that exists: 412 when honoured; ignored (200) or refused as
        #    unknown (OSS: 501) both mean "not honoured". The probe object may be overwritten.
        try:
            await _ask(client, "put_object", **put, IfNoneMatch="*")
            create_only = False
        except _Refused as e:
            create_only = e.status == 412
        # 4. Multipart: FULL_OBJECT CRC32C, else COMPOSITE, else none; ListParts on the way.
        multipart, list_parts = await _probe_multipart(client, bucket, mpu, put_args)
        # 5. Listing and aborting uploads, on an upload left unfinished on purpose.
        up = await _ask(client, "create_multipart_upload", Bucket=bucket, Key=spare, **put_args)
        listing = {"Bucket": bucket, "Prefix": f"{root}/"}
        list_uploads = not await _refused(client, "list_multipart_uploads", **listing)
        aborting = {"Bucket": bucket, "Key": spare, "UploadId": up["UploadId"]}
        abort = not await _refused(client, "abort_multipart_upload", **aborting)
    except _Refused as e:
        kind = PermanentStorageError  # typed, so the daemon can say why (``daemon.reasons``)
        if e.code == "NoSuchBucket":
            kind = BucketMissingError
        elif e.status in (401, 403):
            kind = AccessDeniedError
        raise kind(
            f"probing S3 bucket {bucket}: a plain write under {root}/ was refused: {e}"
        ) from e
    finally:
        for key in (obj, mpu):
            with contextlib.suppress(_Refused, TransientStorageError):
                await _ask(client, "delete_object", Bucket=bucket, Key=key)
    return Capabilities(
        verifies_checksums=verifies,
        reports_checksums=reports,
        verifies_md5=verifies_md5,
        etag_is_md5=etag_is_md5,
        create_only=create_only,
        list_parts=list_parts,
        list_uploads=list_uploads,
        abort_uploads=abort,
        multipart_checksum=multipart,
        sends_checksums=send_checksums,
    )


async def _probe_multipart(
    client: Any, bucket: str, key: str, put_args: dict[str, str]
) -> tuple[str, bool]:
    """The multipart checksum type the server completes an upload with, and whether it lists
    parts. One part of a few bytes is enough (the last part has no minimum size)."""
    crc = _crc32c.crc32c(_DATA)
    list_parts: bool | None = None
    for kind in (FULL_OBJECT, COMPOSITE, NO_CHECKSUM):
        create: dict[str, Any] = {"Bucket": bucket, "Key": key, **put_args}
        part: dict[str, Any] = {}
        complete: dict[str, Any] = {}
        if kind != NO_CHECKSUM:
            create |= {"ChecksumAlgorithm": "CRC32C", "ChecksumType": kind}
            part = {"ChecksumAlgorithm": "CRC32C", "ChecksumCRC32C": b64crc(crc)}
        if kind == FULL_OBJECT:
            complete = {"ChecksumCRC32C": b64crc(crc), "ChecksumType": FULL_OBJECT}
            complete["MpuObjectSize"] = len(_DATA)
        try:
            up = await _ask(client, "create_multipart_upload", **create)
            uid = up["UploadId"]
            sent = await _ask(
                client, "upload_part", Bucket=bucket, Key=key, UploadId=uid, PartNumber=1,
                Body=_DATA, **part,
            )  # fmt: skip
            if list_parts is None:  # asked on the first upload the server took
                listing = {"Bucket": bucket, "Key": key, "UploadId": uid}
                list_parts = not await _refused(client, "list_parts", **listing)
            entry = {"PartNumber": 1, "ETag": sent["ETag"]}
            if part:
                entry["ChecksumCRC32C"] = b64crc(crc)
            await _ask(
                client, "complete_multipart_upload", Bucket=bucket, Key=key, UploadId=uid,
                MultipartUpload={"Parts": [entry]}, **complete,
            )  # fmt: skip
            return kind, bool(list_parts)
        except _Refused as e:
            if kind == NO_CHECKSUM:
                raise
            log.info("s3://%s: multipart upload with %s CRC32C refused (%s)", bucket, kind, e)
    raise AssertionError("unreachable")


__all__ = ["b64crc", "b64md5", "probe_s3"]
