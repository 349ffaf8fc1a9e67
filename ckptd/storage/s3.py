"""S3 (and S3-compatible) store on aiobotocore: ``s3://bucket/prefix``.

aiobotocore has no managed transfer, so the multipart loop is ours: parts are read straight from
the committed file (``os.pread`` in a thread), several in flight, and memory stays bounded by
parts-in-flight x part size however big the file is.

Checksums: every request carries a precomputed CRC32C (``x-amz-checksum-crc32c``, computed with
the ``crc32c`` package; botocore skips its own checksum code, which would need awscrt for CRC32C,
whenever such a header is present). Multipart uploads are created as ``CRC32C``/``FULL_OBJECT``,
so S3 checks every part and then the whole object against the manifest's CRC32C. Because some
S3-compatible servers (moto among them) accept any declared checksum, we also combine the part
CRCs ourselves before completing, and compare the whole-object CRC32C that the server reports
(HeadObject with ChecksumMode) after completing.

Endpoint and credentials come only through botocore's own conventions (``AWS_ENDPOINT_URL``,
the credential chain). Errors are translated in ``_errors()``, the one boundary.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import aiohttp
import crc32c as _crc32c
from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from ..errors import (
    AlreadyExistsError,
    ConfigError,
    CredentialsError,
    IntegrityError,
    NotFoundError,
    PermanentStorageError,
    StorageError,
    TransientStorageError,
)
from .base import (
    ObjectInfo,
    ProgressFn,
    Store,
    crc32c_combine,
    download_ranges,
    load_journal,
    read_range_crc,
    remove_journal,
    run_all,
    save_journal,
)
from .retry import OnRetry, with_retries

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1 << 20
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PART_SIZE = 5 << 30
MAX_PARTS = 10_000
DEFAULT_PART_SIZE = 8 * MiB  # boto3 TransferConfig uses 8 MiB too: more parts in flight per file

NO_CREDENTIALS = (
    "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE "
    "(or run with an instance/task role)"
)

_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchUpload", "NotFound", "404"}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
    "PriorRequestNotComplete",
    # The bytes arrived damaged; sending the same buffer again is the fix.
    "BadDigest",
    "XAmzContentSHA256Mismatch",
}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
}


def _b64crc(value: int) -> str:
    return base64.b64encode(value.to_bytes(4, "big")).decode("ascii")


def _translate(e: BaseException, what: str) -> BaseException | None:
    """The exception ckptd raises for ``e``, or None when ``e`` is not ours to translate."""
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        text = f"{what}: {code or status} {err.get('Message') or ''}".rstrip()
        if code == "NoSuchBucket":
            return PermanentStorageError(f"{what}: the bucket does not exist")
        if status == 412 or code == "PreconditionFailed":
            return AlreadyExistsError(text)
        if code in _NOT_FOUND_CODES or status == 404:
            return NotFoundError(text)
        if code in _TRANSIENT_CODES or status >= 500 or status in (408, 429):
            return TransientStorageError(text)
        if code in _CREDENTIAL_CODES:
            return CredentialsError(f"{text} (the AWS credentials were rejected)")
        return PermanentStorageError(text)
    if isinstance(e, NoCredentialsError | PartialCredentialsError):
        return CredentialsError(f"{what}: {NO_CREDENTIALS}")
    if isinstance(e, HTTPClientError | BotoConnectionError | aiohttp.ClientError | OSError):
        return TransientStorageError(f"{what}: {type(e).__name__}: {e}")
    if isinstance(e, TimeoutError):  # asyncio.TimeoutError is TimeoutError since 3.11
        return TransientStorageError(f"{what}: timed out")
    if isinstance(e, BotoCoreError):
        return PermanentStorageError(f"{what}: {e}")
    return None


@contextlib.contextmanager
def _errors(what: str) -> Iterator[None]:
    """The one boundary where botocore/aiohttp errors become ckptd's storage errors."""
    try:
        yield
    except (ClientError, BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as e:
        mapped = _translate(e, what)
        if mapped is None:
            raise
        raise mapped from e


class S3Store(Store):
    """``s3://bucket/prefix``. Safe to share between tasks of one event loop."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        part_size: int = DEFAULT_PART_SIZE,
        multipart_threshold: int | None = None,
        max_concurrency: int = 8,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        retry_attempts: int = 6,
        retry_base_delay: float = 0.25,
        retry_max_delay: float = 20.0,
        on_retry: OnRetry | None = None,
    ) -> None:
        if not bucket:
            raise ConfigError("S3 store needs a bucket: s3://BUCKET/PREFIX")
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ConfigError(f"part_size must be within 5 MiB..5 GiB (S3 limits), got {part_size}")
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.part_size = part_size
        self.multipart_threshold = part_size if multipart_threshold is None else multipart_threshold
        self.max_concurrency = max_concurrency
        self._retry_kw: dict[str, Any] = {
            "attempts": retry_attempts,
            "base_delay": retry_base_delay,
            "max_delay": retry_max_delay,
        }
        self._on_retry = on_retry
        self._config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max(10, 2 * max_concurrency),
            # We retry ourselves (per part, by type, counted); botocore's own retries stay off.
            retries={"mode": "standard", "total_max_attempts": 1},
            # Checksums are supplied precomputed; don't let botocore hash bodies in the loop.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            tcp_keepalive=True,
            user_agent_extra="ckptd",
        )
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._client_lock: asyncio.Lock | None = None
        self._slots: asyncio.Semaphore | None = None
        self.retries = 0
        """Retries made so far (for the daemon's status)."""
        self.stats: dict[str, int] = {
            "parts_uploaded": 0,
            "parts_resumed": 0,
            "uploads_resumed": 0,
            "uploads_aborted": 0,
        }

    # -- plumbing ------------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        key = key.lstrip("/")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    async def _get_client(self) -> Any:
        if self._client is None:
            if self._client_lock is None:
                self._client_lock = asyncio.Lock()
            async with self._client_lock:
                if self._client is None:
                    stack = contextlib.AsyncExitStack()
                    with _errors(f"creating S3 client for {self.url}"):
                        client = await stack.enter_async_context(
                            get_session().create_client("s3", config=self._config)
                        )
                    self._stack = stack
                    self._slots = asyncio.Semaphore(self.max_concurrency)
                    self._client = client
        return self._client

    async def _call(self, op: str, what: str, **kw: Any) -> dict[str, Any]:
        client = await self._get_client()
        with _errors(what):
            return await getattr(client, op)(**kw)

    def _count_retry(self, attempt: int, exc: BaseException) -> None:
        self.retries += 1
        if self._on_retry is not None:
            self._on_retry(attempt, exc)

    async def _retry(self, fn: Callable[[], Awaitable[T]], what: str) -> T:
        return await with_retries(fn, what=what, on_retry=self._count_retry, **self._retry_kw)

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()

    # -- probe ---------------------------------------------------------------------------------

    async def check_access(self) -> None:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        where = f"S3 bucket {self.bucket!r}" + (f" at {endpoint}" if endpoint else "")
        try:
            await self._call("head_bucket", f"checking {where}", Bucket=self.bucket)
        except NotFoundError as e:
            raise PermanentStorageError(f"{where} does not exist") from e
        except CredentialsError as e:
            if isinstance(e.__cause__, NoCredentialsError | PartialCredentialsError):
                raise CredentialsError(NO_CREDENTIALS) from e
            raise CredentialsError(f"the AWS credentials were rejected by {where}: {e}") from e
        except PermanentStorageError as e:
            raise PermanentStorageError(f"access denied to {where}: {e}") from e

    # -- small objects -------------------------------------------------------------------------

    async def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        full = self._key(key)
        what = f"PUT s3://{self.bucket}/{full}"
        kw: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": full,
            "Body": data,
            "ChecksumAlgorithm": "CRC32C",
            "ChecksumCRC32C": _b64crc(await asyncio.to_thread(_crc32c.crc32c, data)),
        }
        if if_absent:
            kw["IfNoneMatch"] = "*"
        tries = 0

        async def put() -> None:
            nonlocal tries
            tries += 1
            await self._call("put_object", what, **kw)

        try:
            await self._retry(put, what)
        except FileExistsError:
            # A retried create-only PUT meets its own first attempt (whose reply was lost):
            # that is success if the stored bytes are ours.
            if tries > 1 and await self._get_range(full, None, None, what) == data:
                return
            raise

    async def get_bytes(
        self, key: str, *, start: int | None = None, end: int | None = None
    ) -> bytes:
        full = self._key(key)
        what = f"GET s3://{self.bucket}/{full}"
        if end is not None and end <= (start or 0):
            return b""
        return await self._retry(lambda: self._get_range(full, start, end, what), what)

    async def _get_range(
        self, full: str, start: int | None, end: int | None, what: str, if_match: str | None = None
    ) -> bytes:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
        if start or end is not None:
            kw["Range"] = f"bytes={start or 0}-{'' if end is None else end - 1}"
        if if_match:
            kw["IfMatch"] = if_match
        client = await self._get_client()
        with _errors(what):
            try:
                resp = await client.get_object(**kw)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") == "InvalidRange":
                    return b""  # a range past the end reads as empty, as a file would
                raise
            async with resp["Body"] as body:
                return await body.read()

    async def list(self, prefix: str) -> list[ObjectInfo]:
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        if prefix.endswith("/") and not full.endswith("/"):
            full += "/"
        client = await self._get_client()
        what = f"LIST s3://{self.bucket}/{full}"

        async def run() -> list[ObjectInfo]:
            out: list[ObjectInfo] = []
            with _errors(what):
                paginator = client.get_paginator("list_objects_v2")
                async for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                    for obj in page.get("Contents", []):
                        out.append(ObjectInfo(self._rel(obj["Key"]), int(obj["Size"])))
            return sorted(out, key=lambda o: o.key)

        return await self._retry(run, what)

    async def delete(self, key: str) -> None:
        full = self._key(key)
        what = f"DELETE s3://{self.bucket}/{full}"
        with contextlib.suppress(NotFoundError):
            await self._retry(
                lambda: self._call("delete_object", what, Bucket=self.bucket, Key=full), what
            )

    # -- big objects ---------------------------------------------------------------------------

    def part_size_for(self, size: int) -> int:
        """The configured part size, grown (to whole MiB) so that ``size`` fits in 10,000 parts."""
        need = -(-size // MAX_PARTS)
        part = max(self.part_size, -(-need // MiB) * MiB)
        if part > MAX_PART_SIZE:
            raise ConfigError(f"object of {size} bytes exceeds S3's limit of 10,000 x 5 GiB")
        return part

    async def put_file(
        self,
        key: str,
        path: str,
        *,
        size: int,
        crc32c: int,
        journal: str | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        full = self._key(key)
        try:
            actual = os.stat(path).st_size
        except FileNotFoundError as e:
            raise NotFoundError(f"{path}: {e}") from e
        if actual != size:
            raise IntegrityError(f"{path} is {actual} bytes, the manifest says {size}")
        if size <= self.multipart_threshold:
            await self._put_small(full, path, size, crc32c, progress)
            remove_journal(journal)
            return
        await self._put_multipart(full, path, size, crc32c, journal, progress)

    async def _put_small(
        self, full: str, path: str, size: int, crc: int, progress: ProgressFn | None
    ) -> None:
        what = f"PUT s3://{self.bucket}/{full}"
        data, got = await asyncio.to_thread(read_range_crc, path, 0, size)
        if len(data) != size or got != crc:
            raise IntegrityError(
                f"{path} changed before upload: crc32c {got:08x} of {len(data)} bytes, "
                f"expected {crc:08x} of {size}"
            )
        await self._retry(
            lambda: self._call(
                "put_object",
                what,
                Bucket=self.bucket,
                Key=full,
                Body=data,
                ChecksumAlgorithm="CRC32C",
                ChecksumCRC32C=_b64crc(crc),
            ),
            what,
        )
        if progress:
            progress(size)

    async def _put_multipart(
        self,
        full: str,
        path: str,
        size: int,
        crc: int,
        journal: str | None,
        progress: ProgressFn | None,
    ) -> None:
        what = f"multipart upload of {path} to s3://{self.bucket}/{full}"
        state = await self._resume_or_create(full, size, crc, journal)
        upload_id: str = state["upload_id"]
        part_size: int = state["part_size"]
        done: dict[str, dict[str, Any]] = state["parts"]
        nparts = -(-size // part_size)
        pending = iter([n for n in range(1, nparts + 1) if str(n) not in done])
        journal_lock = asyncio.Lock()
        await self._get_client()
        assert self._slots is not None
        slots = self._slots

        async def send(n: int) -> None:
            offset = (n - 1) * part_size
            length = min(part_size, size - offset)
            async with slots:  # store-wide: bounds memory across concurrent uploads
                etag, pcrc = await self._send_part(
                    full, upload_id, n, path, offset, length, f"{what}: part {n}/{nparts}"
                )
            done[str(n)] = {"etag": etag, "crc32c": pcrc, "size": length}
            self.stats["parts_uploaded"] += 1
            if progress:
                progress(length)
            if journal:
                async with journal_lock:
                    await asyncio.to_thread(save_journal, journal, state)

        async def worker() -> None:
            for n in pending:
                await send(n)

        try:
            await run_all([worker() for _ in range(self.max_concurrency)])
            combined = 0
            for n in range(1, nparts + 1):
                part = done[str(n)]
                combined = crc32c_combine(combined, int(part["crc32c"]), int(part["size"]))
            if combined != crc:
                raise IntegrityError(
                    f"{path} changed during upload: its parts have crc32c {combined:08x}, "
                    f"the manifest says {crc:08x}"
                )
            await self._complete(full, upload_id, nparts, done, size, crc, what)
        except (IntegrityError, PermanentStorageError) as e:
            log.warning("%s failed permanently, aborting it: %s", what, e)
            await self._abort(full, upload_id)
            remove_journal(journal)
            raise
        except BaseException:
            # Transient failure after retries, or cancellation: with a journal the upload is kept
            # for a later resume (abort_stale_uploads reaps it if nobody comes back).
            if not journal:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._abort(full, upload_id))
            raise
        remove_journal(journal)

    async def _send_part(
        self, full: str, upload_id: str, n: int, path: str, offset: int, length: int, what: str
    ) -> tuple[str, int]:
        """Read one part from the file and upload it (retried); the buffer lives only here."""
        data, pcrc = await asyncio.to_thread(read_range_crc, path, offset, length)
        if len(data) != length:
            raise IntegrityError(f"{path} shrank during upload (part {n})")
        resp = await self._retry(
            lambda: self._call(
                "upload_part",
                what,
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                PartNumber=n,
                Body=data,
                ChecksumAlgorithm="CRC32C",
                ChecksumCRC32C=_b64crc(pcrc),
            ),
            what,
        )
        return str(resp["ETag"]), pcrc

    async def _resume_or_create(
        self, full: str, size: int, crc: int, journal: str | None
    ) -> dict[str, Any]:
        old = load_journal(journal) if journal else None
        if old is not None:
            same = (
                old.get("backend") == "s3"
                and old.get("bucket") == self.bucket
                and old.get("key") == full
                and old.get("size") == size
                and old.get("crc32c") == crc
            )
            if same:
                state = await self._resume(full, old)
                if state is not None:
                    return state
            elif old.get("upload_id") and old.get("bucket") == self.bucket:
                await self._abort(str(old.get("key")), str(old["upload_id"]))
        what = f"CreateMultipartUpload s3://{self.bucket}/{full}"
        resp = await self._retry(
            lambda: self._call(
                "create_multipart_upload",
                what,
                Bucket=self.bucket,
                Key=full,
                ChecksumAlgorithm="CRC32C",
                ChecksumType="FULL_OBJECT",
            ),
            what,
        )
        state = {
            "backend": "s3",
            "bucket": self.bucket,
            "key": full,
            "size": size,
            "crc32c": crc,
            "part_size": self.part_size_for(size),
            "upload_id": resp["UploadId"],
            "parts": {},
        }
        if journal:
            await asyncio.to_thread(save_journal, journal, state)
        return state

    async def _resume(self, full: str, old: dict[str, Any]) -> dict[str, Any] | None:
        """Keep the journaled parts that the server still lists with the same ETag and size."""
        upload_id = str(old.get("upload_id"))
        what = f"ListParts s3://{self.bucket}/{full} upload {upload_id}"
        try:
            listed = await self._retry(lambda: self._list_parts(full, upload_id, what), what)
        except NotFoundError:
            log.info("%s: upload is gone, starting over", what)
            return None
        parts: dict[str, dict[str, Any]] = {}
        for n, part in dict(old.get("parts") or {}).items():
            seen = listed.get(int(n))
            etag = str(part["etag"]).strip('"')
            if seen and seen[0].strip('"') == etag and seen[1] == part["size"]:
                parts[n] = part
        self.stats["uploads_resumed"] += 1
        self.stats["parts_resumed"] += len(parts)
        log.info("resuming %s: %d parts already uploaded", what, len(parts))
        return {**old, "parts": parts}

    async def _list_parts(self, full: str, upload_id: str, what: str) -> dict[int, tuple[str, int]]:
        client = await self._get_client()
        out: dict[int, tuple[str, int]] = {}
        with _errors(what):
            paginator = client.get_paginator("list_parts")
            async for page in paginator.paginate(Bucket=self.bucket, Key=full, UploadId=upload_id):
                for p in page.get("Parts", []):
                    out[int(p["PartNumber"])] = (str(p["ETag"]), int(p["Size"]))
        return out

    async def _complete(
        self,
        full: str,
        upload_id: str,
        nparts: int,
        done: dict[str, dict[str, Any]],
        size: int,
        crc: int,
        what: str,
    ) -> None:
        parts = [
            {
                "PartNumber": n,
                "ETag": done[str(n)]["etag"],
                "ChecksumCRC32C": _b64crc(int(done[str(n)]["crc32c"])),
            }
            for n in range(1, nparts + 1)
        ]
        cwhat = f"CompleteMultipartUpload s3://{self.bucket}/{full}"
        try:
            await self._retry(
                lambda: self._call(
                    "complete_multipart_upload",
                    cwhat,
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    ChecksumCRC32C=_b64crc(crc),
                    ChecksumType="FULL_OBJECT",
                    MpuObjectSize=size,
                ),
                cwhat,
            )
        except NotFoundError:
            # A retried Complete whose first attempt succeeded: the HEAD below decides.
            log.info("%s: upload already gone; checking the object", cwhat)
        hwhat = f"HEAD s3://{self.bucket}/{full}"
        head = await self._retry(
            lambda: self._call(
                "head_object", hwhat, Bucket=self.bucket, Key=full, ChecksumMode="ENABLED"
            ),
            hwhat,
        )
        reported = head.get("ChecksumCRC32C")
        full_object = head.get("ChecksumType") in (None, "FULL_OBJECT") and "-" not in str(reported)
        if int(head.get("ContentLength", -1)) != size or (
            reported and full_object and reported != _b64crc(crc)
        ):
            with contextlib.suppress(StorageError):
                await self._call("delete_object", hwhat, Bucket=self.bucket, Key=full)
            raise IntegrityError(
                f"{what}: the server holds {head.get('ContentLength')} bytes crc32c {reported}, "
                f"expected {size} bytes crc32c {_b64crc(crc)}"
            )

    async def _abort(self, full: str, upload_id: str) -> None:
        what = f"AbortMultipartUpload s3://{self.bucket}/{full} upload {upload_id}"
        try:
            await self._call(
                "abort_multipart_upload", what, Bucket=self.bucket, Key=full, UploadId=upload_id
            )
            self.stats["uploads_aborted"] += 1
        except NotFoundError:
            pass
        except StorageError as e:
            log.warning("%s failed (abort_stale_uploads will retry): %s", what, e)

    async def abort_stale_uploads(self, prefix: str, older_than_s: float) -> int:
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        client = await self._get_client()
        what = f"ListMultipartUploads s3://{self.bucket}/{full}"
        cutoff = time.time() - older_than_s
        stale: list[tuple[str, str]] = []
        with _errors(what):
            paginator = client.get_paginator("list_multipart_uploads")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for up in page.get("Uploads", []):
                    initiated = up.get("Initiated")
                    when = initiated.timestamp() if initiated is not None else 0.0
                    if up["Key"].startswith(full) and when <= cutoff:
                        stale.append((up["Key"], up["UploadId"]))
        for key, upload_id in stale:
            await self._abort(key, upload_id)
        return len(stale)

    async def get_file(self, key: str, path: str, *, size: int | None = None) -> None:
        full = self._key(key)
        what = f"download s3://{self.bucket}/{full}"
        hwhat = f"HEAD s3://{self.bucket}/{full}"
        head = await self._retry(
            lambda: self._call("head_object", hwhat, Bucket=self.bucket, Key=full), hwhat
        )
        total = int(head["ContentLength"])
        if size is not None and size != total:
            raise IntegrityError(f"{what}: object is {total} bytes, expected {size}")
        etag = head.get("ETag")
        await self._get_client()
        assert self._slots is not None
        await download_ranges(
            path,
            total,
            self.part_size,
            self.max_concurrency,
            self._slots,
            lambda start, end: self._retry(
                lambda: self._get_range(full, start, end, what, if_match=etag), what
            ),
            what,
        )
