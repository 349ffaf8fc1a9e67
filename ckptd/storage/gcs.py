"""Google Cloud Storage store: ``gs://bucket/prefix``.

gcloud-aio-storage serves listing, downloads, deletes and small objects. Big files go through the
chunked resumable protocol, driven over aiohttp here, because gcloud-aio's own resumable upload
sends the whole stream in one PUT, restarts from zero on error and keeps no session URI. Each
request carries up to ``chunk_size_for(size)`` bytes (a multiple of 256 KiB: the configured
``chunk_size``, 128 MiB by default, grown for big files by ``parts.gcs_chunk_size``), streamed
from the file in 4 MiB pieces, the next piece read while the last is sent: memory stays at two
pieces whatever the request size, and a file takes few round trips. The session URI and the
confirmed offset go into the journal after each request so that a restarted daemon resumes.

Checksums: the manifest's CRC32C is declared when the upload starts (``crc32c`` in the object
resource), so GCS refuses to finalize an object whose bytes do not match it; we also track the
CRC32C of what we send (refusing to send the last chunk of a file that changed) and compare the
``crc32c`` the server reports for the finished object, because emulators (fake-gcs-server) accept
any declared value.

``STORAGE_EMULATOR_HOST`` (gcloud-aio's convention) points everything at an emulator, with no token;
otherwise gcloud-aio-auth discovers a service account. Errors are translated in ``_errors()``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import crc32c as _crc32c
from gcloud.aio.auth import Token
from gcloud.aio.storage import Storage
from gcloud.aio.storage.storage import SCOPES, init_api_root

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
    READ_PART,
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
    save_journal,
)
from .options import NONE as NO_OPTIONS
from .options import StoreOptions
from .parts import gcs_chunk_size
from .retry import OnRetry, with_retries

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1 << 20
CHUNK_QUANTUM = 256 << 10  # every chunk but the last must be a multiple of this
DEFAULT_CHUNK_SIZE = 128 * MiB  # bytes per request of a resumable upload (streamed)
SMALL_OBJECT_MAX = 16 * MiB  # up to this, one request from memory (see GCSStore.read_size)
_PIECE = 4 * MiB  # what a request body reads from the file at a time

NO_CREDENTIALS = (
    "no GCP credentials found: set GOOGLE_APPLICATION_CREDENTIALS to a service-account key, "
    "run on GCE/GKE with a service account, or set STORAGE_EMULATOR_HOST for an emulator"
)


class _SessionLost(Exception):
    """The resumable session cannot continue (expired, or finalized short): start a new one."""


def _b64crc(value: int) -> str:
    return base64.b64encode(value.to_bytes(4, "big")).decode("ascii")


def _unb64crc(value: str) -> int:
    return int.from_bytes(base64.b64decode(value), "big")


def _status_error(status: int, text: str) -> BaseException:
    if status == 412:
        return AlreadyExistsError(text)
    if status == 404:
        return NotFoundError(text)
    if status in (429, 503):  # rateLimitExceeded, or a backend shedding load: slow down
        return ThrottledError(text)
    if status == 408 or status >= 500:
        return TransientStorageError(text)
    if status in (401, 403):
        return AccessDeniedError(f"{text} (access denied: check the service account's roles)")
    if status == 400 and "crc32c" in text.lower():
        return IntegrityError(text)
    return PermanentStorageError(text)


class _NoToken(TransientStorageError):
    """No access token could be had: transient for a request, but at the start-up probe of a
    real GCS endpoint it means there are no usable credentials."""


@contextlib.contextmanager
def _errors(what: str) -> Iterator[None]:
    """The one boundary where aiohttp / gcloud-aio errors become ckptd's storage errors."""
    try:
        yield
    except aiohttp.ClientResponseError as e:
        raise _status_error(e.status, f"{what}: HTTP {e.status} {e.message}") from e
    except (aiohttp.ClientConnectionError, ConnectionError) as e:
        raise StoreUnreachableError(f"{what}: {type(e).__name__}: {e}") from e
    except (aiohttp.ClientError, OSError) as e:
        raise TransientStorageError(f"{what}: {type(e).__name__}: {e}") from e
    except TimeoutError as e:  # asyncio.TimeoutError is TimeoutError since 3.11
        raise StoreUnreachableError(f"{what}: timed out") from e


@contextlib.contextmanager
def _insert_errors(what: str) -> Iterator[None]:
    """An object insert (upload) has no 404 of its own: it means the bucket does not exist."""
    try:
        yield
    except NotFoundError as e:
        raise BucketMissingError(f"{what}: the bucket does not exist") from e


class GCSStore(Store):
    """``gs://bucket/prefix``. Safe to share between tasks of one event loop."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        resumable_threshold: int | None = None,
        max_concurrency: int = 6,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        retry_attempts: int = 6,
        retry_base_delay: float = 0.25,
        retry_max_delay: float = 20.0,
        on_retry: OnRetry | None = None,
        options: StoreOptions | None = None,
    ) -> None:
        if not bucket:
            raise ConfigError("GCS store needs a bucket: gs://BUCKET/PREFIX")
        self.options = (options or NO_OPTIONS).check("gs")
        if chunk_size <= 0 or chunk_size % CHUNK_QUANTUM:
            raise ConfigError(
                f"chunk_size must be a positive multiple of 256 KiB, got {chunk_size}"
            )
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"gs://{bucket}/{self.prefix}" if self.prefix else f"gs://{bucket}"
        self.chunk_size = chunk_size
        # The most read into memory at once (x max_concurrency): a small object, a download
        # range, the CRC32C catch-up after a resume. Streamed requests hold only two pieces.
        self.read_size = min(chunk_size, SMALL_OBJECT_MAX)
        self.resumable_threshold = (
            self.read_size if resumable_threshold is None else resumable_threshold
        )
        self.max_concurrency = max_concurrency
        self._timeout = aiohttp.ClientTimeout(sock_connect=connect_timeout, sock_read=read_timeout)
        self._op_timeout = int(connect_timeout + read_timeout)
        self._retry_kw: dict[str, Any] = {
            "attempts": retry_attempts,
            "base_delay": retry_base_delay,
            "max_delay": retry_max_delay,
        }
        self._on_retry = on_retry
        self._session: aiohttp.ClientSession | None = None
        self._storage: Storage | None = None
        self._token: Token | None = None
        self._api_root = ""
        self._is_emulator = False
        self._slots: asyncio.Semaphore | None = None
        self.retries = 0
        """Retries made so far (for the daemon's status)."""
        self.stats: dict[str, int] = {"chunks_uploaded": 0, "uploads_resumed": 0, "sessions": 0}

    # -- plumbing ------------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        key = key.lstrip("/")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def _get_storage(self) -> Storage:
        if self._storage is None:
            self._is_emulator, self._api_root = init_api_root(None)
            self._session = aiohttp.ClientSession(timeout=self._timeout)
            if not self._is_emulator:
                self._token = Token(scopes=SCOPES, session=self._session)
            self._storage = Storage(session=self._session, token=self._token)
            self._slots = asyncio.Semaphore(self.max_concurrency)
        return self._storage

    async def _auth(self) -> dict[str, str]:
        self._get_storage()
        if self._token is None:
            return {}
        try:
            with _errors("getting a GCP access token"):
                token = await self._token.get()
        except TransientStorageError as e:
            raise _NoToken(str(e)) from e
        return {"Authorization": f"Bearer {token}"}

    def _count_retry(self, attempt: int, exc: BaseException) -> None:
        self.retries += 1
        if self._on_retry is not None:
            self._on_retry(attempt, exc)

    async def _retry(self, fn: Callable[[], Awaitable[T]], what: str) -> T:
        return await with_retries(fn, what=what, on_retry=self._count_retry, **self._retry_kw)

    async def close(self) -> None:
        session, self._session, self._storage, self._token = self._session, None, None, None
        if session is not None:
            await session.close()

    # -- probe ---------------------------------------------------------------------------------

    async def check_access(self) -> None:
        storage = self._get_storage()
        where = f"GCS bucket {self.bucket!r}" + (
            f" at {self._api_root}" if self._is_emulator else ""
        )
        try:
            with _errors(f"checking {where}"):
                await storage.get_bucket_metadata(
                    self.bucket, headers=await self._auth(), timeout=self._op_timeout
                )
        except NotFoundError as e:
            raise BucketMissingError(f"{where} does not exist") from e
        except _NoToken as e:
            if self._is_emulator:
                raise
            raise CredentialsError(f"{NO_CREDENTIALS} ({e})") from e
        except AccessDeniedError as e:
            raise AccessDeniedError(f"access denied to {where}: {e}") from e
        except PermanentStorageError as e:
            raise PermanentStorageError(f"access denied to {where}: {e}") from e
        except (ValueError, RuntimeError) as e:  # gcloud-aio-auth: unusable credentials file
            raise CredentialsError(f"{NO_CREDENTIALS} ({e})") from e

    # -- small objects -------------------------------------------------------------------------

    async def _upload_small(self, full: str, data: bytes, crc: int, if_absent: bool) -> None:
        """One multipart request whose metadata declares the crc32c (which GCS checks)."""
        what = f"upload gs://{self.bucket}/{full}"
        storage = self._get_storage()
        tries = 0

        async def put() -> dict[str, Any]:
            nonlocal tries
            tries += 1
            with _insert_errors(what), _errors(what):
                return await storage.upload(
                    self.bucket,
                    full,
                    data,
                    content_type="application/octet-stream",
                    parameters=self._upload_params({"ifGenerationMatch": "0"} if if_absent else {}),
                    headers=await self._auth(),
                    metadata={"crc32c": _b64crc(crc), **self._object_fields()},
                    force_resumable_upload=False,
                    timeout=self._op_timeout,
                )

        try:
            obj = await self._retry(put, what)
        except FileExistsError:
            # A retried create-only upload meets its own first attempt (whose reply was lost).
            if tries > 1 and await self.get_bytes(self._rel(full)) == data:
                return
            raise
        await self._verify(full, obj, len(data), crc, what)

    async def _verify(self, full: str, obj: dict[str, Any], size: int, crc: int, what: str) -> None:
        """Compare what the server says it stored with what the manifest says."""
        reported = obj.get("crc32c")
        if int(obj.get("size", -1)) == size and (reported is None or _unb64crc(reported) == crc):
            return
        with contextlib.suppress(StorageError):
            await self.delete(self._rel(full))
        raise IntegrityError(
            f"{what}: the server stored {obj.get('size')} bytes crc32c {reported}, "
            f"expected {size} bytes crc32c {_b64crc(crc)}"
        )

    def _upload_params(self, params: dict[str, str]) -> dict[str, str]:
        """Upload query parameters with the store's CMEK (``kmsKeyName``), if set."""
        return {**params, "kmsKeyName": self.options.kms_key} if self.options.kms_key else params

    def _object_fields(self) -> dict[str, str]:
        """Object resource fields from the store options (``storageClass``)."""
        sc = self.options.storage_class
        return {"storageClass": sc} if sc else {}

    async def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        crc = await asyncio.to_thread(_crc32c.crc32c, data)
        await self._upload_small(self._key(key), data, crc, if_absent)

    async def get_bytes(
        self, key: str, *, start: int | None = None, end: int | None = None
    ) -> bytes:
        if end is not None and end <= (start or 0):
            return b""
        full = self._key(key)
        what = f"GET gs://{self.bucket}/{full}"
        return await self._retry(lambda: self._get_range(full, start, end, what), what)

    async def _get_range(self, full: str, start: int | None, end: int | None, what: str) -> bytes:
        storage = self._get_storage()
        headers = await self._auth()
        if start or end is not None:
            headers["Range"] = f"bytes={start or 0}-{'' if end is None else end - 1}"
        try:
            with _errors(what):
                return await storage.download(
                    self.bucket, full, headers=headers, timeout=self._op_timeout
                )
        except PermanentStorageError as e:
            if isinstance(e.__cause__, aiohttp.ClientResponseError) and e.__cause__.status == 416:
                return b""  # a range past the end reads as empty, as a file would
            raise

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
        """``Store.read_into`` as concurrent ranged media GETs over the store's aiohttp session,
        each body streamed into its slice of ``buf`` as it arrives (gcloud-aio's ``download``
        would build a ``bytes`` per range). ``Content-Range`` states the object's size: one of
        another size than ``total`` (truncated, replaced) is an ``IntegrityError`` at once."""
        full = self._key(key)
        what = f"GET gs://{self.bucket}/{full}"
        end = offset + len(buf)
        self._get_storage()
        assert self._slots is not None

        async def fetch(start: int, view: memoryview) -> None:
            await self._retry(
                lambda: self._get_range_into(full, start, view, end, total, what), what
            )

        return await read_ranges_into(
            buf,
            offset,
            part_size or READ_PART,
            concurrency or self.max_concurrency,
            fetch,
            progress,
            self._slots,
        )

    async def _get_range_into(
        self, full: str, start: int, view: memoryview, end: int, total: int | None, what: str
    ) -> None:
        self._get_storage()
        assert self._session is not None
        stop = start + len(view)
        url = (
            f"{self._api_root}/storage/v1/b/{quote(self.bucket, safe='')}/o/{quote(full, safe='')}"
        )
        headers = {**await self._auth(), "Range": f"bytes={start}-{stop - 1}"}
        headers["Accept-Encoding"] = "identity"  # the stored bytes, never a decoded body
        # Our own errors are raised outside ``_errors`` (NotFoundError is an OSError there).
        failure: BaseException | None = None
        with _errors(what):
            async with self._session.get(
                url, params={"alt": "media"}, headers=headers, auto_decompress=False
            ) as resp:
                failure = await self._range_failure(resp, start, stop, end, total, what)
                if failure is None:
                    await fill_from_stream(resp.content.read, view, what)
        if failure is not None:
            raise failure

    @staticmethod
    async def _range_failure(
        resp: aiohttp.ClientResponse, start: int, stop: int, end: int, total: int | None, what: str
    ) -> BaseException | None:
        """Why a ranged media response cannot fill its part, or None when it can."""
        if resp.status == 416:
            return IntegrityError(f"{what}: object ends before byte {stop}")
        if resp.status >= 400:
            text = (await resp.text())[:200]
            return _status_error(resp.status, f"{what}: HTTP {resp.status} {text}")
        size = parse_content_range(resp.headers.get("Content-Range"))
        if resp.status == 200:  # the whole object: the server ignored the range
            size = resp.content_length
        if size is not None and ((total is not None and size != total) or size < end):
            want = total if total is not None else f"at least {end}"
            return IntegrityError(f"{what}: object is {size} bytes, expected {want}")
        if resp.status == 200 and start:
            return TransientStorageError(f"{what}: the server ignored the Range header")
        return None

    async def list(self, prefix: str) -> list[ObjectInfo]:
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        if prefix.endswith("/") and not full.endswith("/"):
            full += "/"
        storage = self._get_storage()
        what = f"LIST gs://{self.bucket}/{full}"

        async def run() -> list[ObjectInfo]:
            out: list[ObjectInfo] = []
            token = ""
            while True:
                params = {"prefix": full, "fields": "items(name,size),nextPageToken"}
                if token:
                    params["pageToken"] = token
                with _errors(what):
                    page = await storage.list_objects(
                        self.bucket,
                        params=params,
                        headers=await self._auth(),
                        timeout=self._op_timeout,
                    )
                for item in page.get("items", []):
                    out.append(ObjectInfo(self._rel(item["name"]), int(item["size"]), _when(item)))
                token = page.get("nextPageToken") or ""
                if not token:
                    return sorted(out, key=lambda o: o.key)

        return await self._retry(run, what)

    async def delete(self, key: str) -> None:
        full = self._key(key)
        what = f"DELETE gs://{self.bucket}/{full}"
        storage = self._get_storage()

        async def run() -> None:
            with _errors(what):
                await storage.delete(
                    self.bucket, full, headers=await self._auth(), timeout=self._op_timeout
                )

        with contextlib.suppress(NotFoundError):
            await self._retry(run, what)

    async def get_file(self, key: str, path: str, *, size: int | None = None) -> None:
        full = self._key(key)
        what = f"download gs://{self.bucket}/{full}"
        storage = self._get_storage()

        async def meta() -> dict[str, Any]:
            with _errors(what):
                return await storage.download_metadata(
                    self.bucket, full, headers=await self._auth(), timeout=self._op_timeout
                )

        total = int((await self._retry(meta, what))["size"])
        if size is not None and size != total:
            raise IntegrityError(f"{what}: object is {total} bytes, expected {size}")
        assert self._slots is not None
        await download_ranges(
            path,
            total,
            self.read_size,
            self.max_concurrency,
            self._slots,
            lambda start, end: self._retry(lambda: self._get_range(full, start, end, what), what),
            what,
        )

    # -- big objects: the resumable protocol ---------------------------------------------------

    def chunk_size_for(self, size: int) -> int:
        """Bytes per request of a resumable upload of ``size`` (``parts.gcs_chunk_size``: about
        32 requests per big file, at least the configured chunk size, a multiple of 256 KiB)."""
        return gcs_chunk_size(size, self.chunk_size)

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
        if size <= self.resumable_threshold:
            data, got = await asyncio.to_thread(read_range_crc, path, 0, size)
            if len(data) != size or got != crc32c:
                raise IntegrityError(
                    f"{path} changed before upload: crc32c {got:08x} of {len(data)} bytes, "
                    f"expected {crc32c:08x} of {size}"
                )
            if self.pace is not None:
                await self.pace(size)
            await self._upload_small(full, data, crc32c, False)
            remove_journal(journal)
            if progress:
                progress(size)
            return
        await _ResumableUpload(self, full, path, size, crc32c, journal, progress).run()


class _ResumableUpload:
    """One file through one (or, if a session is lost, a new) resumable session."""

    def __init__(
        self,
        store: GCSStore,
        full: str,
        path: str,
        size: int,
        crc: int,
        journal: str | None,
        progress: ProgressFn | None,
    ) -> None:
        self.s = store
        self.full = full
        self.path = path
        self.size = size
        self.crc = crc
        self.journal = journal
        self.progress = progress
        self.what = f"resumable upload of {path} to gs://{store.bucket}/{full}"
        self.session_uri = ""
        self.offset: int | None = 0  # None: unknown, ask the server
        self.crc_upto = 0  # CRC32C of the file's first crc_upto bytes, as sent ...
        self.crc_val = 0  # ... is crc_val
        self.reported = 0  # bytes reported to ``progress``
        self.chunk = store.chunk_size_for(size)  # any multiple of 256 KiB resumes any session

    def _state(self) -> dict[str, Any]:
        return {
            "backend": "gcs",
            "bucket": self.s.bucket,
            "key": self.full,
            "size": self.size,
            "crc32c": self.crc,
            "session_uri": self.session_uri,
            "offset": self.crc_upto,
            "crc_upto": self.crc_upto,
            "crc_val": self.crc_val,
        }

    async def _save(self) -> None:
        if self.journal:
            await asyncio.to_thread(save_journal, self.journal, self._state())

    async def run(self) -> None:
        old = load_journal(self.journal) if self.journal else None
        if old and all(
            old.get(k) == v
            for k, v in (
                ("backend", "gcs"),
                ("bucket", self.s.bucket),
                ("key", self.full),
                ("size", self.size),
                ("crc32c", self.crc),
            )
        ):
            self.session_uri = str(old["session_uri"])
            self.crc_upto = int(old.get("crc_upto", 0))
            self.crc_val = int(old.get("crc_val", 0))
            self.offset = None  # the server says where to go on
            self.s.stats["uploads_resumed"] += 1
            log.info("%s: resuming session from the journal", self.what)
        elif old and old.get("session_uri"):
            await self._cancel(str(old["session_uri"]))
        try:
            obj = await self._drive()
        except (IntegrityError, PermanentStorageError):
            await self._cancel(self.session_uri)
            remove_journal(self.journal)
            raise
        except BaseException:
            if not self.journal and self.session_uri:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._cancel(self.session_uri))
            raise
        await self.s._verify(self.full, obj, self.size, self.crc, self.what)
        remove_journal(self.journal)

    async def _drive(self) -> dict[str, Any]:
        restarts = 0
        while True:
            try:
                if not self.session_uri:
                    await self._start()
                result: dict[str, Any] | None = None
                while result is None:
                    result = await self.s._retry(self._step, self.what)
                return result
            except _SessionLost as e:
                restarts += 1
                if restarts > 3:
                    raise TransientStorageError(
                        f"{self.what}: session lost {restarts} times"
                    ) from e
                log.warning("%s: %s; starting a new session", self.what, e)
                self.session_uri = ""
                self.offset = 0

    async def _start(self) -> None:
        self.s._get_storage()
        url = f"{self.s._api_root}/upload/storage/v1/b/{quote(self.s.bucket, safe='')}/o"
        what = f"{self.what}: starting a session"
        body = json.dumps(
            {"name": self.full, "crc32c": _b64crc(self.crc), **self.s._object_fields()}
        )
        assert self.s._session is not None
        session = self.s._session

        async def post() -> str:
            headers = await self.s._auth()
            headers.update(
                {
                    "Content-Type": "application/json; charset=UTF-8",
                    "X-Upload-Content-Type": "application/octet-stream",
                    "X-Upload-Content-Length": str(self.size),
                }
            )
            with _errors(what):
                async with session.post(
                    url,
                    params=self.s._upload_params({"uploadType": "resumable", "name": self.full}),
                    data=body,
                    headers=headers,
                ) as resp:
                    if resp.status == 404:  # an insert has no other 404: the bucket is gone
                        raise BucketMissingError(f"{what}: the bucket does not exist")
                    if resp.status >= 400:
                        raise _status_error(resp.status, f"{what}: {await resp.text()}")
                    location = resp.headers.get("Location")
                    await resp.read()
            if not location:
                raise TransientStorageError(f"{what}: no session URI in the reply")
            return location

        self.session_uri = await self.s._retry(post, what)
        self.s.stats["sessions"] += 1
        self.offset = 0
        self.crc_upto = self.crc_val = 0
        await self._save()

    async def _step(self) -> dict[str, Any] | None:
        """Query the session or send the next chunk; the finished object, or None to go on."""
        try:
            if self.offset is None:
                return await self._query()
            return await self._send_chunk(self.offset)
        except TransientStorageError:
            self.offset = None  # after any failure, the server says where to resume
            raise

    async def _put(
        self, headers: dict[str, str], data: bytes | AsyncIterator[bytes], what: str
    ) -> dict[str, Any] | int:
        """PUT to the session URI: the object (final), or the offset the server has (308)."""
        headers = {**(await self.s._auth()), **headers}
        assert self.s._session is not None
        with _errors(what):
            # 308 is the protocol's "resume incomplete", not a redirect to follow
            async with self.s._session.put(
                self.session_uri, data=data, headers=headers, allow_redirects=False
            ) as resp:
                text = await resp.text()
                if resp.status == 308:
                    rng = resp.headers.get("Range")  # "bytes=0-N"; absent means nothing yet
                    return int(rng.rsplit("-", 1)[1]) + 1 if rng else 0
                if resp.status in (200, 201):
                    return dict(json.loads(text))
                if resp.status in (404, 410):
                    raise _SessionLost(f"session answered HTTP {resp.status}")
                raise _status_error(resp.status, f"{what}: HTTP {resp.status} {text[:300]}")

    async def _query(self) -> dict[str, Any] | None:
        got = await self._put(
            {"Content-Range": f"bytes */{self.size}"}, b"", f"{self.what}: status query"
        )
        if isinstance(got, dict):
            if int(got.get("size", -1)) != self.size:
                # fake-gcs-server finalizes a session on a status query (real GCS never does).
                raise _SessionLost(f"session finalized at {got.get('size')} of {self.size} bytes")
            return got
        await self._advance_to(got)
        return None

    async def _advance_to(self, offset: int) -> None:
        """Accept ``offset`` as the server's, bringing the running CRC32C up to it."""
        if offset < self.crc_upto:
            self.crc_upto = self.crc_val = 0
        while self.crc_upto < offset:
            n = min(self.s.read_size, offset - self.crc_upto)
            _, c = await asyncio.to_thread(read_range_crc, self.path, self.crc_upto, n)
            self.crc_val = crc32c_combine(self.crc_val, c, n)
            self.crc_upto += n
        self.offset = offset
        if self.progress and offset > self.reported:
            self.progress(offset - self.reported)
            self.reported = offset
        await self._save()

    async def _send_chunk(self, offset: int) -> dict[str, Any] | None:
        if offset != self.crc_upto:
            await self._advance_to(offset)
        length = min(self.chunk, self.size - offset)
        if self.s.pace is not None:
            await self.s.pace(length)
        body = _FileBody(self, offset, length)
        try:
            got = await self._put(
                {
                    "Content-Range": f"bytes {offset}-{offset + length - 1}/{self.size}",
                    "Content-Length": str(length),  # a stream of known size: not chunked
                },
                body.stream(),
                f"{self.what}: bytes {offset}-{offset + length - 1}",
            )
        except StorageError:
            if body.failure is not None:  # the body stopped itself: aiohttp reports a lost send
                raise body.failure from None
            raise
        if body.failure is not None:
            raise body.failure
        self.s.stats["chunks_uploaded"] += 1
        if isinstance(got, dict):
            if self.progress and self.size > self.reported:
                self.progress(self.size - self.reported)
                self.reported = self.size
            return got
        if got == offset + length:
            self.crc_upto, self.crc_val = got, body.crc
        await self._advance_to(got)
        return None

    async def _cancel(self, session_uri: str) -> None:
        """Best effort: GCS answers a DELETE on the session with 499 and drops it."""
        if not session_uri or self.s._session is None:
            return
        with contextlib.suppress(StorageError, aiohttp.ClientError, OSError, TimeoutError):
            headers = await self.s._auth()
            async with self.s._session.delete(session_uri, headers=headers) as resp:
                await resp.read()


class _FileBody:
    """One request's bytes, read from the file while they are sent, with their running CRC32C.

    Before the file's last piece goes out, the CRC32C of everything sent must equal the
    manifest's: a file that changed is never finalized (emulators ignore the declared crc32c).
    A failure stops the stream; aiohttp reports that as a lost connection, so it is kept in
    ``failure`` for the caller to raise instead.
    """

    def __init__(self, up: _ResumableUpload, offset: int, length: int) -> None:
        self.up = up
        self.offset = offset
        self.end = offset + length
        self.crc = up.crc_val  # CRC32C of the file up to ``offset``, then up to what was read
        self.failure: IntegrityError | None = None

    def _read(self, pos: int) -> asyncio.Future[tuple[bytes, int]]:
        n = min(_PIECE, self.end - pos)
        return asyncio.ensure_future(asyncio.to_thread(read_range_crc, self.up.path, pos, n))

    async def stream(self) -> AsyncIterator[bytes]:
        pos = self.offset
        pending = self._read(pos)
        try:
            while pos < self.end:
                data, c = await pending
                n = min(_PIECE, self.end - pos)
                if len(data) != n:
                    self.failure = IntegrityError(f"{self.up.path} shrank during upload")
                    raise self.failure
                self.crc = crc32c_combine(self.crc, c, n)
                pos += n
                if pos < self.end:
                    pending = self._read(pos)  # read ahead while this piece is sent
                elif self.end == self.up.size and self.crc != self.up.crc:
                    self.failure = IntegrityError(
                        f"{self.up.path} changed during upload: crc32c {self.crc:08x}, "
                        f"the manifest says {self.up.crc:08x}"
                    )
                    raise self.failure
                yield data
        finally:
            if not pending.done():
                pending.cancel()


def _when(item: dict[str, Any]) -> float | None:
    """``updated`` (RFC 3339) of a listed object as seconds since the epoch, if valid."""
    value = item.get("updated")
    if not isinstance(value, str):
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
