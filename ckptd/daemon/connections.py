"""The client side of the daemon: the socket, its framing, and one ``Client`` per connection.

Everything a client can do to the daemon's resources is bounded here, before a message reaches
a stage: connections (``MAX_CLIENTS``), bytes of unfinished frames across all clients
(``MAX_BUFFERED``), the time a started frame may take (``FRAME_DEADLINE``), and replies: each
client has a bounded outbox drained by its own sender task, so a client that never reads is
dropped after ``SEND_TIMEOUT`` and never stalls another one. Running out of descriptors at
``accept`` is logged and retried. The socket's directory must be ours and closed to others:
whoever can write there can put their own socket in its place.

Stages never touch sockets: they call ``Client.send`` (which never blocks) and read the
``Client`` fields the hello set.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import ConfigError, ProtocolError
from ..protocol import MAX_FRAME, ErrorEvent, Event, FrameReader, encode

log = logging.getLogger("ckptd.daemon")

MAX_CLIENTS = 512
"""Connections at once; more are refused with a message (each costs fds and memory)."""
MAX_BUFFERED = 128 << 20
"""Bytes of unfinished incoming messages across all clients: half-sent frames cannot make the
daemon's memory grow without bound."""
FRAME_DEADLINE = 30.0
"""A message that has started arriving must be whole within this many seconds."""
OUTBOX = 1024
SEND_TIMEOUT = 15.0
"""A client that has not taken a reply within this many seconds is dropped."""

Dispatch = Callable[["Client", dict[str, Any], FrameReader], Awaitable[None]]


class Client:
    """One connection: its socket, its outbox, the slots it sent, and what its hello said."""

    def __init__(self, cid: int, sock: socket.socket, drop: Callable[[Client], None]) -> None:
        self.id = cid
        self.sock = sock
        self.send_lock = asyncio.Lock()
        self.outbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=OUTBOX)
        self.sender: asyncio.Task[None] | None = None
        self.reader: asyncio.Task[None] | None = None
        self.buffered = 0  # bytes of unfinished incoming frames
        self.slots: dict[int, tuple[int, int, int]] = {}  # index -> (fd, size, generation)
        self.run: str | None = None
        self.store: str | None = None
        self.pid: int | None = None
        self.alive = True
        self._drop = drop

    def send(self, msg: Event) -> None:
        """Queue a message; never waits for the client to read it. A full outbox drops it."""
        if not self.alive:
            return
        try:
            self.outbox.put_nowait(encode(msg.to_wire()))
        except asyncio.QueueFull:
            log.warning("client %d (pid %s) does not read its replies; dropping it",
                        self.id, self.pid)  # fmt: skip
            self._drop(self)

    def set_slot(self, index: int, fd: int, size: int, generation: int) -> None:
        """Keep the client's slot descriptor (the client may replace it; the old one closes)."""
        old = self.slots.pop(index, None)
        if old is not None:
            os.close(old[0])
        self.slots[index] = (fd, size, generation)

    def close_fds(self) -> None:
        for fd, _, _ in self.slots.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.slots.clear()


def check_socket_dir(parent: str) -> None:
    """The socket's directory must be ours and writable by nobody else (or a sticky directory
    of root's, like /tmp): whoever can write there can replace the socket with their own and
    read every save of every client."""
    st = os.lstat(parent)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"socket directory {parent} is not a plain directory (a symlink?)")
    sticky_system = bool(st.st_mode & stat.S_ISVTX) and st.st_uid == 0
    if st.st_uid != os.geteuid() and not sticky_system:
        raise ConfigError(
            f"socket directory {parent} belongs to uid {st.st_uid}, not to this user "
            f"(uid {os.geteuid()}): another user may have created it to intercept saves. "
            "Remove it or choose another --socket"
        )
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(
            f"socket directory {parent} is writable by other users (mode "
            f"{stat.S_IMODE(st.st_mode):o}): chmod go-w it or choose another --socket"
        )


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class ClientServer:
    """Listens, accepts, reads frames and hands whole messages to ``dispatch``."""

    def __init__(
        self,
        path: str,
        *,
        gid: int | None,
        dispatch: Dispatch,
        on_drop: Callable[[Client], None],
        spawn: Callable[..., asyncio.Task[Any]],
    ) -> None:
        self.path = path
        self.gid = gid
        self.clients: dict[int, Client] = {}
        self._dispatch = dispatch
        self._on_drop = on_drop
        self._spawn = spawn
        self._next_id = 1
        self._buffered = 0
        self._sock: socket.socket | None = None

    # ---- the listening socket --------------------------------------------------------------

    def listen(self) -> None:
        path = self.path
        parent = os.path.dirname(path)
        os.makedirs(parent, mode=0o700, exist_ok=True)
        check_socket_dir(parent)
        if os.path.lexists(path) and os.lstat(path).st_uid != os.geteuid():
            raise ConfigError(
                f"{path} exists and belongs to uid {os.lstat(path).st_uid}, not to this user: "
                "refusing to serve there (someone else may be waiting for your saves)"
            )
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale socket of a dead daemon
            else:
                raise ConfigError(f"another ckptd daemon is listening on {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        if self.gid is not None:
            os.chown(path, -1, self.gid)
            os.chmod(path, 0o660)
        else:
            os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock

    def close(self) -> None:
        """Stop accepting (the socket file goes, so new clients see no daemon); keep clients."""
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def close_all(self) -> None:
        for client in list(self.clients.values()):
            self.drop(client)

    async def accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        backoff = 0.05
        while True:
            try:
                sock, _ = await loop.sock_accept(self._sock)
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                # Out of descriptors: the pending client waits in the backlog until some close.
                log.error("cannot accept a client: %s; retrying in %.2f s", e.strerror, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            sock.setblocking(False)
            if len(self.clients) >= MAX_CLIENTS:
                log.warning("refusing a client: %d connections already", len(self.clients))
                with contextlib.suppress(OSError):
                    sock.send(encode(ErrorEvent(error="too many clients connected").to_wire()))
                sock.close()
                continue
            client = Client(self._next_id, sock, self.drop)
            self._next_id += 1
            self.clients[client.id] = client
            client.sender = self._spawn(self._sender(client))
            client.reader = self._spawn(self._serve(client))

    # ---- one client --------------------------------------------------------------------------

    async def _sender(self, client: Client) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frame = await client.outbox.get()
            try:
                async with client.send_lock:
                    await asyncio.wait_for(loop.sock_sendall(client.sock, frame), SEND_TIMEOUT)
            except TimeoutError:
                log.warning("client %d (pid %s) has not read its replies for %.0f s; dropping it",
                            client.id, client.pid, SEND_TIMEOUT)  # fmt: skip
                self.drop(client)
                return
            except OSError as e:
                log.debug("cannot tell client %d: %s", client.id, e)
                self.drop(client)
                return

    @staticmethod
    async def _recv(sock: socket.socket) -> tuple[bytes, list[int]]:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(sock, 1 << 20, 4)
            except BlockingIOError:
                fut: asyncio.Future[None] = loop.create_future()
                loop.add_reader(sock.fileno(), _wake, fut)
                try:
                    await fut
                finally:
                    if sock.fileno() != -1:  # drop() may have closed it meanwhile
                        loop.remove_reader(sock.fileno())
                continue
            if flags & socket.MSG_CTRUNC:
                for fd in fds:
                    os.close(fd)
                raise ProtocolError("too many file descriptors in one message")
            return data, fds

    async def _serve(self, client: Client) -> None:
        reader = FrameReader(MAX_FRAME)
        try:
            while True:
                if reader.pending_bytes:
                    try:
                        data, fds = await asyncio.wait_for(self._recv(client.sock), FRAME_DEADLINE)
                    except TimeoutError:
                        raise ProtocolError(
                            f"a message stayed unfinished for {FRAME_DEADLINE:.0f} s"
                        ) from None
                else:
                    data, fds = await self._recv(client.sock)
                if not data and not fds:
                    break
                reader.feed(data, fds)
                self._account(client, reader.pending_bytes)
                if self._buffered > MAX_BUFFERED:
                    raise ProtocolError(
                        f"the daemon holds {self._buffered >> 20} MiB of unfinished messages "
                        "from its clients; dropping this one"
                    )
                for msg in reader.messages():
                    self._account(client, reader.pending_bytes)
                    await self._dispatch(client, msg, reader)
                self._account(client, reader.pending_bytes)
        except ProtocolError as e:
            log.warning("client %d (pid %s): %s; dropping the connection", client.id, client.pid, e)
            await self._send_last(client, ErrorEvent(error=str(e)))
        except (ConnectionError, OSError) as e:
            log.info("client %d (pid %s) went away: %s", client.id, client.pid, e)
        finally:
            self._account(client, 0)
            while reader.fds:
                with contextlib.suppress(OSError):
                    os.close(reader.fds.popleft())
            self.drop(client)

    def _account(self, client: Client, pending: int) -> None:
        self._buffered += pending - client.buffered
        client.buffered = pending

    @staticmethod
    async def _send_last(client: Client, msg: Event) -> None:
        """A final message before dropping the client: sent now, briefly, past the queue."""
        with contextlib.suppress(OSError, TimeoutError):
            async with client.send_lock:
                await asyncio.wait_for(
                    asyncio.get_running_loop().sock_sendall(client.sock, encode(msg.to_wire())), 1.0
                )

    def drop(self, client: Client) -> None:
        """Forget a client on every path (EOF, error, a full outbox); idempotent."""
        if not client.alive:
            return
        client.alive = False
        current = asyncio.current_task()
        for task in (client.sender, client.reader):
            if task is not None and task is not current:
                task.cancel()
        self._on_drop(client)
        self.clients.pop(client.id, None)
        client.close_fds()
        # Unregister before closing: a closed fd's number is soon another client's, and a stale
        # registration would then hand that client's readiness to this one's dead reader.
        if (fd := client.sock.fileno()) != -1:
            with contextlib.suppress(ValueError, KeyError, OSError):
                asyncio.get_running_loop().remove_reader(fd)
        with contextlib.suppress(OSError):
            client.sock.close()
