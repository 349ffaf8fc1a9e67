"""A small fault-injecting TCP proxy for HTTP/1.1 servers on loopback.

The proxy runs its own asyncio loop in a background thread, so the same object serves sync tests
and async tests (whose loop it never touches). It parses the client's requests just enough
(request line, headers, Content-Length body) to act per request:

- ``fail_next(k, status=503)``: answer the next ``k`` matching requests itself, not forwarding them
- ``fail_rate(fraction, status=503, seed=0)``: answer that fraction of matching requests itself,
  drawn from a seeded generator (throttling at scale, reproducibly)
- ``reset_next(k)``: reset the connection on the next ``k`` matching requests (nothing forwarded)
- ``reset_after(nbytes)``: reset the connection once ``nbytes`` more request bytes have passed
- ``stall(seconds)``: hold the next response bytes for a while
- ``limit_bandwidth(bytes_per_s)``: throttle both directions
- ``down()`` / ``up()``: refuse (reset) every connection until cleared
- ``refuse_ops("ListParts", "ListMultipartUploads", "AbortMultipartUpload", status=405)``:
  answer those S3 operations with ``status`` (a server without them: s3rver answers 405/501)
- ``refuse_header(name, value, status=400)``: answer requests carrying that header (R2 refusing
  ``x-amz-checksum-type: FULL_OBJECT``)
- ``ignore_if_none_match()``: forward requests without ``If-None-Match`` (create-only ignored)
- ``strip_checksums()``: drop ``x-amz-checksum-*`` headers from responses (a server that does
  not report checksums); applies to connections opened after it is set

The S3-compatibility modes stay on until ``clear()``.

``injected`` counts what was done; ``requests`` lists every request line seen (for assertions
such as "no part was sent twice"); ``calls`` lists each request as (operation, path, injected),
the operation named as S3 names it (``s3_operation``), and ``count()`` tallies them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections import Counter
from typing import Any, NamedTuple
from urllib.parse import unquote

_REASONS = {403: "Forbidden", 429: "Too Many Requests", 500: "Internal Server Error"}
_REASONS |= {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
_S3_CODES = {403: "AccessDenied", 429: "SlowDown", 503: "SlowDown", 500: "InternalError"}
_REASONS |= {400: "Bad Request", 405: "Method Not Allowed", 501: "Not Implemented"}
_S3_CODES |= {400: "InvalidRequest", 405: "MethodNotAllowed", 501: "NotImplemented"}


class Call(NamedTuple):
    op: str  # "PutObject", "UploadPart", ... (s3_operation)
    path: str  # the request path without the query (with a listing's prefix: request_path)
    injected: bool  # answered (or reset) by the proxy, never seen by the server


def s3_operation(line: str) -> str:
    """The S3 operation of an HTTP request line (path-style or virtual-host addressing)."""
    method, _, rest = line.partition(" ")
    target = rest.rsplit(" ", 1)[0]
    path, _, query = target.partition("?")
    q = {kv.split("=", 1)[0] for kv in query.split("&") if kv}
    if method == "PUT":
        return "UploadPart" if "partNumber" in q else "PutObject"
    if method == "POST":
        if "uploads" in q:
            return "CreateMultipartUpload"
        if "uploadId" in q:
            return "CompleteMultipartUpload"
        return "DeleteObjects" if "delete" in q else "POST"
    if method == "GET":
        if "uploadId" in q:
            return "ListParts"
        if "uploads" in q:
            return "ListMultipartUploads"
        if "list-type" in q or "prefix" in q:
            return "ListObjectsV2"
        return "GetObject"
    if method == "HEAD":
        return "HeadBucket" if path.strip("/").count("/") == 0 else "HeadObject"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in q else "DeleteObject"
    return method


def request_path(line: str) -> str:
    """The path of a request line; for a listing (``?prefix=P``), the bucket's path + ``/P``,
    so that counting by key prefix counts the listings of that prefix too."""
    target = line.split(" ", 2)[1] if line.count(" ") >= 2 else ""
    path, _, query = target.partition("?")
    for kv in query.split("&"):
        name, _, value = kv.partition("=")
        if name == "prefix":
            return path.rstrip("/") + "/" + unquote(value)
    return path


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed peer or middlebox would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port`` with switchable faults."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.injected: Counter[str] = Counter()
        self.requests: list[str] = []
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._fail: list[Any] = [0, 503, None]  # remaining, status, match
        self._rate: list[Any] = [0.0, 503, None, random.Random(0)]  # fraction, status, match, rng
        self._reset_req: list[Any] = [0, None]  # remaining, match
        self._reset_bytes: int | None = None
        self._stalls: list[Any] = [0, 0.0]  # remaining, seconds
        self._bps: float | None = None
        self._down = False
        self._refused_ops: dict[str, int] = {}  # S3 operation -> status
        self._refused_header: tuple[str, str, int] | None = None
        self._drop_if_none_match = False
        self._strip_checksums = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        ready = threading.Event()
        loop = asyncio.new_event_loop()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)

            async def boot() -> None:
                self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
                self.port = self._server.sockets[0].getsockname()[1]
                ready.set()

            loop.run_until_complete(boot())
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._conns):
                w.transport.abort()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> FaultProxy:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    # -- faults --------------------------------------------------------------------------------

    def fail_next(self, k: int = 1, status: int = 503, match: str | None = None) -> None:
        """Answer the next ``k`` requests whose request line contains ``match`` with ``status``."""
        with self._lock:
            self._fail = [k, status, match]

    def fail_rate(
        self, fraction: float, status: int = 503, match: str | None = None, seed: int = 0
    ) -> None:
        """Answer ``fraction`` of the requests whose line contains ``match`` with ``status``."""
        with self._lock:
            self._rate = [fraction, status, match, random.Random(seed)]

    def count(self, prefix: str = "", injected: bool = False) -> Counter[str]:
        """Requests per operation whose path starts with ``prefix``: those the server saw, or
        with ``injected`` those the proxy answered itself."""
        with self._lock:
            calls = list(self.calls)
        return Counter(c.op for c in calls if c.injected == injected and c.path.startswith(prefix))

    def reset_next(self, k: int = 1, match: str | None = None) -> None:
        """Reset the connection on the next ``k`` matching requests, forwarding nothing."""
        with self._lock:
            self._reset_req = [k, match]

    def reset_after(self, nbytes: int) -> None:
        """Reset the connection carrying the request byte that passes ``nbytes`` from now."""
        with self._lock:
            self._reset_bytes = nbytes

    def stall(self, seconds: float, count: int = 1) -> None:
        """Hold the next ``count`` response chunks for ``seconds`` each."""
        with self._lock:
            self._stalls = [count, seconds]

    def limit_bandwidth(self, bytes_per_s: float | None) -> None:
        with self._lock:
            self._bps = bytes_per_s

    def down(self) -> None:
        """Refuse every connection (and drop open ones) until ``up()`` or ``clear()``."""
        with self._lock:
            self._down = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._drop_all)

    def up(self) -> None:
        with self._lock:
            self._down = False

    def refuse_ops(self, *ops: str, status: int = 405) -> None:
        """Answer requests of these S3 operations (``s3_operation`` names) with ``status``."""
        with self._lock:
            self._refused_ops.update(dict.fromkeys(ops, status))

    def refuse_header(self, name: str, value: str, status: int = 400) -> None:
        """Answer every request whose header ``name`` has ``value`` with ``status``."""
        with self._lock:
            self._refused_header = (name.lower(), value, status)

    def ignore_if_none_match(self, on: bool = True) -> None:
        with self._lock:
            self._drop_if_none_match = on

    def strip_checksums(self, on: bool = True) -> None:
        with self._lock:
            self._strip_checksums = on

    def clear(self) -> None:
        """Stop injecting anything (counters are kept)."""
        with self._lock:
            self._fail = [0, 503, None]
            self._rate[0] = 0.0
            self._reset_req = [0, None]
            self._reset_bytes = None
            self._stalls = [0, 0.0]
            self._bps = None
            self._down = False
            self._refused_ops = {}
            self._refused_header = None
            self._drop_if_none_match = False
            self._strip_checksums = False

    def _drop_all(self) -> None:
        for w in list(self._conns):
            _reset(w)

    # -- data path -----------------------------------------------------------------------------

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        with self._lock:
            down = self._down
        if down:
            self.injected["refused"] += 1
            _reset(cwriter)
            return
        try:
            sreader, swriter = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(cwriter)
            return
        self._conns.update((cwriter, swriter))
        with self._lock:
            strip = self._strip_checksums
        methods: asyncio.Queue[str] = asyncio.Queue()
        up = asyncio.ensure_future(self._upstream(creader, swriter, cwriter, methods))
        downstream = asyncio.ensure_future(
            self._downstream_stripped(sreader, cwriter, methods)
            if strip
            else self._downstream(sreader, cwriter)
        )
        try:
            await asyncio.wait([up, downstream], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (up, downstream):
                t.cancel()
            await asyncio.gather(up, downstream, return_exceptions=True)
            for w in (cwriter, swriter):
                self._conns.discard(w)
                w.transport.abort()

    async def _throttle(self, n: int) -> None:
        with self._lock:
            bps = self._bps
        if bps:
            await asyncio.sleep(n / bps)

    async def _forward(
        self, data: bytes, swriter: asyncio.StreamWriter, cwriter: asyncio.StreamWriter
    ) -> bool:
        """Send request bytes upstream; False when a byte-count reset fired."""
        with self._lock:
            budget = self._reset_bytes
            if budget is not None:
                if len(data) >= budget:
                    self._reset_bytes = None
                else:
                    self._reset_bytes = budget - len(data)
        if budget is not None and len(data) >= budget:
            swriter.write(data[:budget])
            with contextlib.suppress(ConnectionError):
                await swriter.drain()
            self.injected["reset"] += 1  # counted before the client sees the reset
            _reset(cwriter)
            _reset(swriter)
            return False
        await self._throttle(len(data))
        swriter.write(data)
        await swriter.drain()
        return True

    def _rated(self, line: str) -> int | None:
        """The status to answer ``line`` with under ``fail_rate``, or None to forward it."""
        with self._lock:
            fraction, status, match, rng = self._rate
            if fraction > 0 and (match is None or match in line) and rng.random() < fraction:
                return int(status)
        return None

    def _take(self, slot: list[Any], line: str, match_index: int) -> bool:
        with self._lock:
            match = slot[match_index]
            if slot[0] > 0 and (match is None or match in line):
                slot[0] -= 1
                return True
        return False

    async def _upstream(
        self,
        creader: asyncio.StreamReader,
        swriter: asyncio.StreamWriter,
        cwriter: asyncio.StreamWriter,
        methods: asyncio.Queue[str] | None = None,
    ) -> None:
        while True:
            try:
                head = await creader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            line = lines[0]
            headers = {}
            for h in lines[1:]:
                if ":" in h:
                    name, value = h.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            self.requests.append(line)
            length = int(headers.get("content-length", "0") or 0)
            chunked = "chunked" in headers.get("transfer-encoding", "").lower()
            call = Call(s3_operation(line), request_path(line), False)
            if self._take(self._reset_req, line, 1):
                self.calls.append(call._replace(injected=True))
                self.injected["reset"] += 1
                _reset(cwriter)
                return
            status = self._fail[1] if self._take(self._fail, line, 2) else self._rated(line)
            if status is None:
                status = self._refusal(call.op, headers)
            if status is not None:
                self.calls.append(call._replace(injected=True))
                head_only = line.startswith("HEAD ")
                await self._answer(creader, cwriter, headers, length, chunked, head_only, status)
                return
            self.calls.append(call)
            with self._lock:
                drop_inm = self._drop_if_none_match
            if drop_inm and "if-none-match" in headers:
                self.injected["if_none_match_dropped"] += 1
                kept = [h for h in lines if not h.lower().startswith("if-none-match:")]
                head = "\r\n".join(kept).encode("latin-1")
            if methods is not None:
                methods.put_nowait(line.split(" ", 1)[0])
            if not await self._forward(head, swriter, cwriter):
                return
            if chunked:  # not parsed further: pipe the rest of the connection through
                while data := await creader.read(1 << 16):
                    if not await self._forward(data, swriter, cwriter):
                        return
                return
            while length > 0:
                data = await creader.read(min(length, 1 << 16))
                if not data:
                    return
                length -= len(data)
                if not await self._forward(data, swriter, cwriter):
                    return

    async def _answer(
        self,
        creader: asyncio.StreamReader,
        cwriter: asyncio.StreamWriter,
        headers: dict[str, str],
        length: int,
        chunked: bool,
        head_only: bool = False,
        status: int | None = None,
    ) -> None:
        """Reply with the injected status instead of forwarding, then close the connection."""
        with self._lock:
            status = self._fail[1] if status is None else status
        if "100-continue" not in headers.get("expect", "").lower() and not chunked:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                await creader.readexactly(length)
        code = _S3_CODES.get(status, str(status))
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>injected by faultproxy</Message></Error>"
        ).encode()
        reason = _REASONS.get(status, "Error")
        self.injected[f"http_{status}"] += 1  # counted before the client can see the answer
        cwriter.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + (b"" if head_only else body)
        )
        with contextlib.suppress(ConnectionError):
            await cwriter.drain()
        cwriter.close()

    async def _downstream(
        self, sreader: asyncio.StreamReader, cwriter: asyncio.StreamWriter
    ) -> None:
        while True:
            try:
                data = await sreader.read(1 << 16)
            except ConnectionError:
                return
            if not data:
                return
            if self._stall_take():
                with self._lock:
                    seconds = self._stalls[1]
                self.injected["stall"] += 1
                await asyncio.sleep(seconds)
            await self._throttle(len(data))
            cwriter.write(data)
            try:
                await cwriter.drain()
            except ConnectionError:
                return

    def _refusal(self, op: str, headers: dict[str, str]) -> int | None:
        """The status an S3-compatibility mode answers this request with, if any."""
        with self._lock:
            if op in self._refused_ops:
                return self._refused_ops[op]
            if self._refused_header is not None:
                name, value, status = self._refused_header
                if headers.get(name) == value:
                    return status
        return None

    async def _downstream_stripped(
        self,
        sreader: asyncio.StreamReader,
        cwriter: asyncio.StreamWriter,
        methods: asyncio.Queue[str],
    ) -> None:
        """Forward responses one by one, without their ``x-amz-checksum-*`` headers."""
        while True:
            try:
                head = await sreader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            kept = [h for h in lines if not h.lower().startswith("x-amz-checksum")]
            if len(kept) != len(lines):
                self.injected["checksums_stripped"] += 1
            fields = {h.split(":", 1)[0].strip().lower(): h.split(":", 1)[1].strip()
                      for h in kept[1:] if ":" in h}  # fmt: skip
            words = lines[0].split(" ")
            status = int(words[1]) if len(words) > 1 and words[1].isdigit() else 0
            method = methods.get_nowait() if not methods.empty() else ""
            if status == 100:
                methods.put_nowait(method)  # its real response is still to come
            cwriter.write("\r\n".join(kept).encode("latin-1"))
            if "chunked" in fields.get("transfer-encoding", "").lower():
                while data := await sreader.read(1 << 16):  # not parsed further: pipe the rest
                    cwriter.write(data)
                    await cwriter.drain()
                return
            length = 0 if method == "HEAD" or status in (100, 204, 304) else None
            if length is None:
                length = int(fields.get("content-length", "0") or 0)
            while length > 0:
                data = await sreader.read(min(length, 1 << 16))
                if not data:
                    return
                length -= len(data)
                cwriter.write(data)
            try:
                await cwriter.drain()
            except ConnectionError:
                return

    def _stall_take(self) -> bool:
        with self._lock:
            if self._stalls[0] > 0:
                self._stalls[0] -= 1
                return True
        return False
