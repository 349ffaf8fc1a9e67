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

S3-compatible servers lack some of this (see ``capabilities``): the store probes the server once
(``capabilities()``, cached) and falls back where a feature is missing: Content-MD5, the ETag
compared with our MD5, or a read-back of the object for the check; COMPOSITE or no multipart
checksum where FULL_OBJECT is refused; a check before and a read-back after a create-only write
that the server does not honour; the journal's own parts where ListParts is missing.

Endpoint and credentials come only through botocore's own conventions (``AWS_ENDPOINT_URL``,
the credential chain, ``AWS_CA_BUNDLE``, proxies, the profile's ``s3.addressing_style``); so
does ``request_checksum_calculation``: set to ``when_required`` it stops ckptd's CRC32C headers
too. Errors are translated in ``_errors()``, the one boundary.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
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
    AccessDeniedError,
    AlreadyExistsError,
    BucketMissingError,
    ConfigError,
    CredentialsError,
    IntegrityError,
    NotFoundError,
    PermanentStorageError,
    StorageError,
    StoreUnreachableError,
    ThrottledError,
    TransientStorageError,
)
from .base import (
    ObjectInfo,
    ProgressFn,
    Store,
    crc32c_combine,
    download_ranges,
    fill_from_stream,
    load_journal,
    parse_content_range,
    read_range_crc,
    read_ranges_into,
    remove_journal,
    run_all,
    save_journal,
)
from .capabilities import FULL_OBJECT, NO_CHECKSUM, Capabilities
from .options import NONE as NO_OPTIONS
from .options import StoreOptions
from .parts import read_part_for, s3_part_size
from .retry import OnRetry, with_retries
from .s3probe import probe_s3

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
# The server asks us to slow down: retried from a longer backoff (with 429 and every 503, which
# S3 sends as SlowDown or ServiceUnavailable when a prefix partition is hot).
_THROTTLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "ServiceUnavailable",
}
_TRANSIENT_CODES = {
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
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


def _md5(data: bytes) -> bytes:
    return hashlib.md5(data).digest()


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
            return BucketMissingError(f"{what}: the bucket does not exist")
        if status == 412 or code == "PreconditionFailed":
            return AlreadyExistsError(text)
        if code in _NOT_FOUND_CODES or status == 404:
            return NotFoundError(text)
        if code in _THROTTLE_CODES or status in (429, 503):
            return ThrottledError(text)
        if code in _TRANSIENT_CODES or status >= 500 or status == 408:
            return TransientStorageError(text)
        if code in _CREDENTIAL_CODES:
            return CredentialsError(f"{text} (the AWS credentials were rejected)")
        if status in (401, 403):
            return AccessDeniedError(text)
        return PermanentStorageError(text)
    if isinstance(e, NoCredentialsError | PartialCredentialsError):
        return CredentialsError(f"{what}: {NO_CREDENTIALS}")
    if isinstance(e, BotoConnectionError | aiohttp.ClientConnectionError | ConnectionError):
        return StoreUnreachableError(f"{what}: {type(e).__name__}: {e}")
    if isinstance(e, HTTPClientError | aiohttp.ClientError | OSError):
        return TransientStorageError(f"{what}: {type(e).__name__}: {e}")
    if isinstance(e, TimeoutError):  # asyncio.TimeoutError is TimeoutError since 3.11
        return StoreUnreachableError(f"{what}: timed out")
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
        options: StoreOptions | None = None,
        capabilities: Capabilities | None = None,
    ) -> None:
        if not bucket:
            raise ConfigError("S3 store needs a bucket: s3://BUCKET/PREFIX")
        self.options = (options or NO_OPTIONS).check("s3")
        self._caps: Capabilities | None = capabilities
        self._caps_lock: asyncio.Lock | None = None
        self._send_crc = True
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
            "read_back_bytes": 0,
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
                    session = get_session()
                    # The user's own setting (AWS_REQUEST_CHECKSUM_CALCULATION or the profile):
                    # "when_required" is the usual cure for servers that choke on checksum
                    # headers, so it turns ours off too.
                    want = session.get_config_variable("request_checksum_calculation")
                    self._send_crc = str(want).lower() != "when_required"
                    with _errors(f"creating S3 client for {self.url}"):
                        client = await stack.enter_async_context(
                            session.create_client("s3", config=self._config)
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
        except (NotFoundError, BucketMissingError) as e:
            raise BucketMissingError(f"{where} does not exist") from e
        except CredentialsError as e:
            if isinstance(e.__cause__, NoCredentialsError | PartialCredentialsError):
                raise CredentialsError(NO_CREDENTIALS) from e
            raise CredentialsError(f"the AWS credentials were rejected by {where}: {e}") from e
        except AccessDeniedError as e:
            raise AccessDeniedError(f"access denied to {where}: {e}") from e
        except PermanentStorageError as e:
            raise PermanentStorageError(f"access denied to {where}: {e}") from e

    async def capabilities(self) -> Capabilities:
        """Probe the server once (a few small requests under ``<prefix>/.ckptd/``), then cached."""
        if self._caps is None:
            if self._caps_lock is None:
                self._caps_lock = asyncio.Lock()
            async with self._caps_lock:
                if self._caps is None:
                    client = await self._get_client()
                    self._caps = await probe_s3(
                        client, self.bucket, self.prefix, self.options.s3_args(),
                        self._send_crc, self._count_retry,
                    )  # fmt: skip
        return self._caps

    def _check_args(self, caps: Capabilities, crc: int, md5: bytes | None) -> dict[str, Any]:
        """The integrity headers of one PUT/UploadPart, per what the server checks."""
        kw: dict[str, Any] = {}
        if caps.sends_checksums:
            kw = {"ChecksumAlgorithm": "CRC32C", "ChecksumCRC32C": _b64crc(crc)}
        if md5 is not None and caps.integrity == "md5":
            kw["ContentMD5"] = base64.b64encode(md5).decode("ascii")
        return kw

    @staticmethod
    def _check_etag(caps: Capabilities, resp: dict[str, Any], md5: bytes | None, what: str) -> None:
        """Where the server's ETag is the MD5 it computed, a different one means the bytes were
        damaged on the way: retried (the same buffer is sent again)."""
        if caps.integrity == "etag-md5" and md5 is not None:
            etag = str(resp.get("ETag", "")).strip('"')
            if etag != md5.hex():
                raise TransientStorageError(f"{what}: server's MD5 {etag} is not ours {md5.hex()}")

    @staticmethod
    def _needs_md5(caps: Capabilities) -> bool:
        return caps.integrity in ("md5", "etag-md5")

    # -- small objects -------------------------------------------------------------------------

    async def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        full = self._key(key)
        what = f"PUT s3://{self.bucket}/{full}"
        caps = await self.capabilities()
        crc = await asyncio.to_thread(_crc32c.crc32c, data)
        md5 = hashlib.md5(data).digest() if self._needs_md5(caps) else None
        kw: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": full,
            "Body": data,
            **self.options.s3_args(),
            **self._check_args(caps, crc, md5),
        }
        if if_absent and not caps.create_only:
            await self._put_create_only_fallback(full, data, kw, what)
            return
        if if_absent:
            kw["IfNoneMatch"] = "*"
        tries = 0

        async def put() -> None:
            nonlocal tries
            tries += 1
            resp = await self._call("put_object", what, **kw)
            try:
                self._check_etag(caps, resp, md5, what)
            except TransientStorageError:
                if if_absent:  # our damaged object must not block our own retry
                    with contextlib.suppress(StorageError):
                        await self._call("delete_object", what, Bucket=self.bucket, Key=full)
                raise
            if caps.integrity == "read-back":
                await self._read_back(full, len(data), crc, what)

        try:
            await self._retry(put, what)
        except FileExistsError:
            # A retried create-only PUT meets its own first attempt (whose reply was lost):
            # that is success if the stored bytes are ours.
            if tries > 1 and await self._get_range(full, None, None, what) == data:
                return
            raise

    async def _put_create_only_fallback(
        self, full: str, data: bytes, kw: dict[str, Any], what: str
    ) -> None:
        """Create-only where the server ignores ``If-None-Match``: look first (an existing
        object is ours from an earlier attempt, or another writer's: refused), write, then read
        back: other bytes there mean another writer's PUT landed after ours (a lost race).
        Two writers inside the same round trip can still both see their own bytes; the manifest's
        unique ``attempt`` id makes any later reader see which one won."""
        try:
            theirs = await self._retry(lambda: self._get_range(full, None, None, what), what)
        except NotFoundError:
            theirs = None
        if theirs is not None:
            if theirs == data:
                return
            raise AlreadyExistsError(f"{what}: the object exists already (create-only)")
        caps = await self.capabilities()
        md5 = hashlib.md5(data).digest() if self._needs_md5(caps) else None

        async def put() -> None:
            self._check_etag(caps, await self._call("put_object", what, **kw), md5, what)

        await self._retry(put, what)
        back = await self._retry(lambda: self._get_range(full, None, None, what), what)
        if back != data:
            raise AlreadyExistsError(
                f"{what}: another writer's object replaced ours right after it was written "
                "(the server does not honour If-None-Match); theirs is kept"
            )

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

    async def read_into(
        self,
        key: str,
        buf: memoryview,
        *,
        offset: int = 0,
        total: int | None = None,
        concurrency: int | None = None,
        part_size: int | None = None,
        progress: ProgressFn | None = None,
    ) -> int:
        """``Store.read_into`` as concurrent ranged GETs, each body streamed into its slice of
        ``buf`` as it arrives. Every response's ``Content-Range`` states the object's size: one
        of another size than ``total`` (truncated, replaced) is an ``IntegrityError`` at once."""
        full = self._key(key)
        what = f"GET s3://{self.bucket}/{full}"
        end = offset + len(buf)
        await self._get_client()
        assert self._slots is not None

        async def fetch(start: int, view: memoryview) -> None:
            await self._retry(
                lambda: self._get_range_into(full, start, view, end, total, what), what
            )

        workers = concurrency or self.max_concurrency
        return await read_ranges_into(
            buf,
            offset,
            part_size or read_part_for(len(buf), workers),
            workers,
            fetch,
            progress,
            self._slots,
        )

    async def _get_range_into(
        self, full: str, start: int, view: memoryview, end: int, total: int | None, what: str
    ) -> None:
        stop = start + len(view)
        client = await self._get_client()
        with _errors(what):
            try:
                resp = await client.get_object(
                    Bucket=self.bucket, Key=full, Range=f"bytes={start}-{stop - 1}"
                )
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") == "InvalidRange":
                    raise IntegrityError(f"{what}: object ends before byte {stop}") from e
                raise
            async with resp["Body"] as body:
                size = parse_content_range(resp.get("ContentRange"))
                if size is not None and ((total is not None and size != total) or size < end):
                    want = total if total is not None else f"at least {end}"
                    raise IntegrityError(f"{what}: object is {size} bytes, expected {want}")
                if int(resp.get("ContentLength", len(view))) != len(view):
                    raise IntegrityError(
                        f"{what}: range {start}-{stop} returned {resp.get('ContentLength')} bytes"
                    )
                await fill_from_stream(body.read, view, what)

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
                        out.append(ObjectInfo(self._rel(obj["Key"]), int(obj["Size"]), _when(obj)))
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
        """The part size for a new upload of ``size`` bytes (``parts.s3_part_size``: about 32
        parts per big file, at least the configured size, within S3's limits). A resumed upload
        keeps the part size its journal recorded."""
        return s3_part_size(size, self.part_size)

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
        if self.pace is not None:
            await self.pace(size)
        caps = await self.capabilities()
        md5 = await asyncio.to_thread(_md5, data) if self._needs_md5(caps) else None
        kw = {"Bucket": self.bucket, "Key": full, "Body": data, **self.options.s3_args()}
        kw |= self._check_args(caps, crc, md5)

        async def put() -> None:
            self._check_etag(caps, await self._call("put_object", what, **kw), md5, what)
            if caps.integrity == "read-back":
                await self._read_back(full, size, crc, what)

        await self._retry(put, what)
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
        fresh: bool = False,
    ) -> None:
        what = f"multipart upload of {path} to s3://{self.bucket}/{full}"
        state = await self._resume_or_create(full, size, crc, None if fresh else journal)
        upload_id: str = state["upload_id"]
        part_size: int = state["part_size"]
        ctype: str = state.get("checksum_type", FULL_OBJECT)
        done: dict[str, dict[str, Any]] = state["parts"]
        if progress and done:  # parts a resumed upload finds in the store count as done (as
            progress(sum(int(p["size"]) for p in done.values()))  # GCS's resumed offset does)
        assembled = False
        nparts = -(-size // part_size)
        pending = iter([n for n in range(1, nparts + 1) if str(n) not in done])
        journal_lock = asyncio.Lock()
        await self._get_client()
        assert self._slots is not None
        slots = self._slots

        async def send(n: int) -> None:
            offset = (n - 1) * part_size
            length = min(part_size, size - offset)
            if self.pace is not None:  # the upload bandwidth limit, before taking a slot
                await self.pace(length)
            async with slots:  # store-wide: bounds memory across concurrent uploads
                etag, pcrc = await self._send_part(
                    full, upload_id, n, path, offset, length, f"{what}: part {n}/{nparts}", ctype
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
            await self._complete(full, upload_id, nparts, done, size, crc, what, ctype)
            assembled = True
            await self._check_complete(full, done, nparts, size, crc, what)
        except (IntegrityError, PermanentStorageError, TransientStorageError) as e:
            # A resumed upload the server will not complete (it lost or never listed the parts
            # the journal names; s3rver and moto answer 500 for an unknown upload) or whose
            # journaled parts do not add up: a fresh upload, never a permanent failure (a cut
            # connection keeps the journal instead). A fresh one re-reads the file, so a file
            # that really changed still fails below.
            server_said = not isinstance(e, StoreUnreachableError | ThrottledError)
            if state.get("resumed") and not assembled and server_said:
                log.warning("%s: cannot finish the resumed upload (%s); starting afresh", what, e)
                await self._abort(full, upload_id)
                remove_journal(journal)
                await self._put_multipart(full, path, size, crc, journal, progress, fresh=True)
                return
            if isinstance(e, TransientStorageError):
                if assembled:
                    remove_journal(journal)
                elif not journal:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self._abort(full, upload_id))
                raise
            log.warning("%s failed permanently, aborting it: %s", what, e)
            await self._abort(full, upload_id)
            remove_journal(journal)
            raise
        except BaseException:
            # Transient failure after retries, or cancellation: with a journal the upload is kept
            # for a later resume (abort_stale_uploads reaps it if nobody comes back). Once it was
            # assembled there is nothing left to resume.
            if assembled:
                remove_journal(journal)
            elif not journal:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._abort(full, upload_id))
            raise
        remove_journal(journal)

    async def _send_part(
        self,
        full: str,
        upload_id: str,
        n: int,
        path: str,
        offset: int,
        length: int,
        what: str,
        ctype: str = FULL_OBJECT,
    ) -> tuple[str, int]:
        """Read one part from the file and upload it (retried); the buffer lives only here."""
        data, pcrc = await asyncio.to_thread(read_range_crc, path, offset, length)
        if len(data) != length:
            raise IntegrityError(f"{path} shrank during upload (part {n})")
        caps = await self.capabilities()
        md5 = await asyncio.to_thread(_md5, data) if self._needs_md5(caps) else None
        checks = self._check_args(caps, pcrc, md5)
        if ctype == NO_CHECKSUM:  # an upload created without an algorithm takes none per part
            checks.pop("ChecksumAlgorithm", None)
            checks.pop("ChecksumCRC32C", None)

        async def send() -> dict[str, Any]:
            resp = await self._call(
                "upload_part", what, Bucket=self.bucket, Key=full, UploadId=upload_id,
                PartNumber=n, Body=data, **checks,
            )  # fmt: skip
            self._check_etag(caps, resp, md5, what)
            return resp

        resp = await self._retry(send, what)
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
        caps = await self.capabilities()
        ctype = caps.multipart_checksum if caps.sends_checksums else NO_CHECKSUM
        create: dict[str, Any] = {"Bucket": self.bucket, "Key": full, **self.options.s3_args()}
        if ctype != NO_CHECKSUM:
            create |= {"ChecksumAlgorithm": "CRC32C", "ChecksumType": ctype}
        resp = await self._retry(
            lambda: self._call("create_multipart_upload", what, **create), what
        )
        state = {
            "backend": "s3",
            "bucket": self.bucket,
            "key": full,
            "size": size,
            "crc32c": crc,
            "part_size": self.part_size_for(size),
            "upload_id": resp["UploadId"],
            "checksum_type": ctype,
            "parts": {},
        }
        if journal:
            await asyncio.to_thread(save_journal, journal, state)
        return state

    async def _resume(self, full: str, old: dict[str, Any]) -> dict[str, Any] | None:
        """Keep the journaled parts that the server still lists with the same ETag and size."""
        upload_id = str(old.get("upload_id"))
        what = f"ListParts s3://{self.bucket}/{full} upload {upload_id}"
        caps = await self.capabilities()
        listed: dict[int, tuple[str, int]] | None = None
        if caps.list_parts:
            try:
                listed = await self._retry(lambda: self._list_parts(full, upload_id, what), what)
            except NotFoundError:
                log.info("%s: upload is gone, starting over", what)
                return None
            except PermanentStorageError as e:
                log.warning("%s refused (%s): resuming from the journal's parts", what, e)
        if listed is None:
            # No ListParts: trust the journal's own record (each part was journaled only after
            # the server acknowledged it). A Complete the server refuses starts a fresh upload.
            parts = dict(old.get("parts") or {})
            self.stats["uploads_resumed"] += 1
            self.stats["parts_resumed"] += len(parts)
            log.info("resuming %s from the journal: %d parts", what, len(parts))
            return {**old, "parts": parts, "resumed": True}
        parts: dict[str, dict[str, Any]] = {}
        for n, part in dict(old.get("parts") or {}).items():
            seen = listed.get(int(n))
            etag = str(part["etag"]).strip('"')
            if seen and seen[0].strip('"') == etag and seen[1] == part["size"]:
                parts[n] = part
        self.stats["uploads_resumed"] += 1
        self.stats["parts_resumed"] += len(parts)
        log.info("resuming %s: %d parts already uploaded", what, len(parts))
        return {**old, "parts": parts, "resumed": True}

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
        ctype: str = FULL_OBJECT,
    ) -> None:
        parts: list[dict[str, Any]] = []
        for n in range(1, nparts + 1):
            entry: dict[str, Any] = {"PartNumber": n, "ETag": done[str(n)]["etag"]}
            if ctype != NO_CHECKSUM:
                entry["ChecksumCRC32C"] = _b64crc(int(done[str(n)]["crc32c"]))
            parts.append(entry)
        whole: dict[str, Any] = {}
        if ctype == FULL_OBJECT:
            whole = {"ChecksumCRC32C": _b64crc(crc), "ChecksumType": FULL_OBJECT}
            whole["MpuObjectSize"] = size
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
                    **whole,
                ),
                cwhat,
            )
        except NotFoundError:
            # A retried Complete whose first attempt succeeded: the HEAD after it decides.
            log.info("%s: upload already gone; checking the object", cwhat)

    async def _check_complete(
        self,
        full: str,
        done: dict[str, dict[str, Any]],
        nparts: int,
        size: int,
        crc: int,
        what: str,
    ) -> None:
        """Compare what the server assembled with what we sent: size always, then the whole
        CRC32C it reports (FULL_OBJECT), its multipart ETag (where ETags are MD5s), or a
        read-back of the object, per the store's capabilities."""
        caps = await self.capabilities()
        hwhat = f"HEAD s3://{self.bucket}/{full}"
        head = await self._retry(
            lambda: self._call(
                "head_object", hwhat, Bucket=self.bucket, Key=full, ChecksumMode="ENABLED"
            ),
            hwhat,
        )
        reported = head.get("ChecksumCRC32C")
        full_object = head.get("ChecksumType") in (None, "FULL_OBJECT") and "-" not in str(reported)
        etag = str(head.get("ETag", "")).strip('"')
        want_etag = None
        read_back = caps.integrity == "read-back"
        if caps.integrity == "etag-md5" and "-" not in etag:
            read_back = True  # not the MD5-of-part-MD5s form (s3rver): check by reading it
        elif caps.integrity == "etag-md5":
            md5s = b"".join(bytes.fromhex(str(done[str(n)]["etag"]).strip('"')) for n in
                            range(1, nparts + 1))  # fmt: skip
            want_etag = f"{hashlib.md5(md5s).hexdigest()}-{nparts}"
        if (
            int(head.get("ContentLength", -1)) != size
            or (reported and full_object and reported != _b64crc(crc))
            or (want_etag is not None and etag != want_etag)
        ):
            with contextlib.suppress(StorageError):
                await self._call("delete_object", hwhat, Bucket=self.bucket, Key=full)
            raise IntegrityError(
                f"{what}: the server holds {head.get('ContentLength')} bytes crc32c {reported} "
                f"etag {etag}, expected {size} bytes crc32c {_b64crc(crc)}"
                + (f" etag {want_etag}" if want_etag else "")
            )
        if read_back:
            await self._read_back(full, size, crc, what)

    async def _read_back(self, full: str, size: int, crc: int, what: str) -> None:
        """Read the object back in ranges and compare its CRC32C, for servers that neither
        check nor report one: damaged bytes are deleted and the write fails transiently (it is
        sent again), so no manifest ever names an object that was not verified."""
        await self._get_client()
        assert self._slots is not None
        slots = self._slots
        step = self.part_size
        spans = [(a, min(a + step, size)) for a in range(0, size, step)]
        crcs = [0] * len(spans)
        rwhat = f"read-back of s3://{self.bucket}/{full}"

        async def one(i: int) -> None:
            a, b = spans[i]
            async with slots:
                data = await self._retry(lambda: self._get_range(full, a, b, rwhat), rwhat)
            if len(data) != b - a:
                raise TransientStorageError(f"{rwhat}: range {a}-{b} returned {len(data)} bytes")
            crcs[i] = await asyncio.to_thread(_crc32c.crc32c, data)

        await run_all([one(i) for i in range(len(spans))])
        got = 0
        for (a, b), c in zip(spans, crcs, strict=True):
            got = crc32c_combine(got, c, b - a)
        self.stats["read_back_bytes"] += size
        if got != crc:
            with contextlib.suppress(StorageError):
                await self._call("delete_object", rwhat, Bucket=self.bucket, Key=full)
            raise TransientStorageError(
                f"{what}: read back crc32c {got:08x}, sent {crc:08x}: damaged on the way, "
                "deleted; it is written again"
            )

    async def _abort(self, full: str, upload_id: str) -> None:
        what = f"AbortMultipartUpload s3://{self.bucket}/{full} upload {upload_id}"
        if not (await self.capabilities()).abort_uploads:
            return  # the server cannot abort: its parts stay (see docs/stores.md)
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
        unsupported = f"{what}: the server cannot list multipart uploads; none reaped"
        if not (await self.capabilities()).list_uploads:
            log.warning("%s", unsupported)
            return 0
        with _errors(what):
            paginator = client.get_paginator("list_multipart_uploads")
            try:
                async for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                    for up in page.get("Uploads", []):
                        initiated = up.get("Initiated")
                        when = initiated.timestamp() if initiated is not None else 0.0
                        if up["Key"].startswith(full) and when <= cutoff:
                            stale.append((up["Key"], up["UploadId"]))
            except ClientError as e:
                status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
                if status not in (405, 501):
                    raise
                log.warning("%s", unsupported)
                return 0
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


def _when(obj: dict[str, Any]) -> float | None:
    """LastModified of a listed object as seconds since the epoch, if the server gave one."""
    value = obj.get("LastModified")
    return value.timestamp() if hasattr(value, "timestamp") else None
