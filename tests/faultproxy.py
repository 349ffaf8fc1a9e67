"""A small fault-injecting TCP proxy for HTTP/1.1 servers on loopback.

The proxy runs its own asyncio loop in a background thread, so the same object serves sync tests
and async tests (whose loop it never touches). It parses the client's requests just enough
(request line, headers, Content-Length body) to act per request:

- ``fail_next(k, status=503)``: answer the next ``k`` matching requests itself, not forwarding them
- ``reset_next(k)``: reset the connection on the next ``k`` matching requests (nothing forwarded)
- ``reset_after(nbytes)``: reset the connection once ``nbytes`` more request bytes have passed
- ``stall(seconds)``: hold the next response bytes for a while
- ``limit_bandwidth(bytes_per_s)``: throttle both directions
- ``down()`` / ``up()``: refuse (reset) every connection until cleared

``injected`` counts what was done; ``requests`` lists every request line seen (for assertions
such as "no part was sent twice").
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections import Counter
from typing import Any

_REASONS = {403: "Forbidden", 429: "Too Many Requests", 500: "Internal Server Error"}
_REASONS |= {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
_S3_CODES = {403: "AccessDenied", 429: "SlowDown", 503: "SlowDown", 500: "InternalError"}


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
        self._lock = threading.Lock()
        self._fail: list[Any] = [0, 503, None]  # remaining, status, match
        self._reset_req: list[Any] = [0, None]  # remaining, match
        self._reset_bytes: int | None = None
        self._stalls: list[Any] = [0, 0.0]  # remaining, seconds
        self._bps: float | None = None
        self._down = False
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

    def clear(self) -> None:
        """Stop injecting anything (counters are kept)."""
        with self._lock:
            self._fail = [0, 503, None]
            self._reset_req = [0, None]
            self._reset_bytes = None
            self._stalls = [0, 0.0]
            self._bps = None
            self._down = False

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
        up = asyncio.ensure_future(self._upstream(creader, swriter, cwriter))
        downstream = asyncio.ensure_future(self._downstream(sreader, cwriter))
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
            if self._take(self._reset_req, line, 1):
                self.injected["reset"] += 1
                _reset(cwriter)
                return
            if self._take(self._fail, line, 2):
                head_only = line.startswith("HEAD ")
                await self._answer(creader, cwriter, headers, length, chunked, head_only)
                return
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
    ) -> None:
        """Reply with the injected status instead of forwarding, then close the connection."""
        with self._lock:
            status = self._fail[1]
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

    def _stall_take(self) -> bool:
        with self._lock:
            if self._stalls[0] > 0:
                self._stalls[0] -= 1
                return True
        return False
