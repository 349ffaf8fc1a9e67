"""The socket to the daemon: framed requests and a reader thread for events. No torch.

Typed messages (``ckptd.protocol``) go in and come out; plain dicts are still taken, and answered
with plain dicts, for callers written before the types.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pwd
import queue
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from typing import Any, overload

from .errors import DaemonUnavailableError, ProtocolError
from .protocol import Event, FrameReader, Request, encode, parse_event

log = logging.getLogger("ckptd.client")


def trusted_uids() -> set[int]:
    """Whom a client hands its state to: itself, root (who can read it anyway), and the users
    named in ``$CKPTD_DAEMON_USER`` (names or uids, comma-separated: a daemon that runs as its own
    user under systemd)."""
    uids = {os.getuid(), 0}
    for item in filter(
        None, (x.strip() for x in os.environ.get("CKPTD_DAEMON_USER", "").split(","))
    ):
        if item.isdigit():
            uids.add(int(item))
            continue
        try:
            uids.add(pwd.getpwnam(item).pw_uid)
        except KeyError:
            log.warning("CKPTD_DAEMON_USER names %r, which is no user here", item)
    return uids


def check_peer(sock: socket.socket, path: str) -> None:
    """Refuse to talk to a process at ``path`` that runs as a user we do not trust: another
    local user who took the socket path would otherwise receive every weight byte."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", raw)
    if uid not in trusted_uids():
        raise DaemonUnavailableError(
            f"the process at {path} (pid {pid}) runs as uid {uid}, not as you (uid "
            f"{os.getuid()}): refusing to send it anything. If that daemon is yours, set "
            f"CKPTD_DAEMON_USER={uid}; otherwise someone else holds your socket path"
        )


class Connection:
    """The socket to the daemon, with a reader thread that routes events to handlers.

    ``on_event`` gets every event that is not the reply to a ``request`` (from the reader
    thread); events this client does not know are logged and skipped. ``on_close`` is called once
    when the connection ends, however it ends.
    """

    def __init__(
        self,
        path: str,
        timeout: float,
        on_event: Callable[[Event], None] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise DaemonUnavailableError(
                f"no ckptd daemon at {path} ({e.strerror or e}). Start one with "
                f"`ckptd serve --socket {path}` (or under systemd), or point CKPTD_SOCKET at it"
            ) from None
        try:
            check_peer(self.sock, path)
        except DaemonUnavailableError:
            self.sock.close()
            raise
        self.sock.settimeout(None)
        self._send_lock = threading.Lock()
        self._on_event = on_event
        self._on_close = on_close
        self.alive = True
        # rid -> the queue its reply goes to; None in it means the connection ended first.
        self._replies: dict[int, queue.Queue[dict[str, Any] | None]] = {}
        self._rids = itertools.count(1)
        self._thread = threading.Thread(target=self._read_loop, name="ckptd-events", daemon=True)
        self._thread.start()

    def send(self, msg: Request | Mapping[str, Any], fd: int | None = None) -> None:
        """Send one message (with ``fd`` attached: the ``slot`` op)."""
        frame = encode(msg.to_wire() if isinstance(msg, Request) else dict(msg))
        try:
            with self._send_lock:
                if fd is None:
                    self.sock.sendall(frame)
                else:
                    sent = socket.send_fds(self.sock, [frame], [fd])
                    if sent < len(frame):
                        self.sock.sendall(frame[sent:])
        except OSError as e:
            self.alive = False
            raise DaemonUnavailableError(
                f"lost the connection to the ckptd daemon at {self.path}: {e}"
            ) from e

    @overload
    def request(self, msg: Request, timeout: float | None = 30.0) -> Event: ...
    @overload
    def request(self, msg: Mapping[str, Any], timeout: float | None = 30.0) -> dict[str, Any]: ...

    def request(
        self, msg: Request | Mapping[str, Any], timeout: float | None = 30.0
    ) -> Event | dict[str, Any]:
        """Send ``msg`` and return the daemon's reply to it.

        ``timeout=None`` waits as long as the daemon takes (a flush or a drain may rightly take
        long), but never past the end of the connection. A typed request gets a typed event
        (``ProtocolError`` if the reply is malformed); a dict gets the reply's dict.
        """
        rid = next(self._rids)
        q: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=1)
        self._replies[rid] = q
        if isinstance(msg, Request):
            op, wire = msg.NAME, {**msg.to_wire(), "rid": rid}
        else:
            op, wire = msg.get("op"), {**msg, "rid": rid}
        try:
            if not self.alive:  # the reader ended before it could see this request's queue
                raise DaemonUnavailableError(
                    f"the connection to the daemon at {self.path} is closed"
                )
            self.send(wire)
            try:
                reply = q.get(timeout=timeout)
            except queue.Empty:
                raise DaemonUnavailableError(
                    f"the daemon at {self.path} did not answer {op!r}"
                ) from None
        finally:
            self._replies.pop(rid, None)
        if reply is None:
            raise DaemonUnavailableError(f"the daemon at {self.path} went away during {op!r}")
        return parse_event(reply) if isinstance(msg, Request) else reply

    def _read_loop(self) -> None:
        reader = FrameReader()
        try:
            while True:
                data = self.sock.recv(1 << 20)
                if not data:
                    break
                reader.feed(data)
                for msg in reader.messages():
                    rid = msg.get("rid")
                    if isinstance(rid, int) and (q := self._replies.get(rid)) is not None:
                        with contextlib.suppress(queue.Full):  # a second reply: the first counts
                            q.put_nowait(msg)
                    elif self._on_event is not None:
                        try:
                            event = parse_event(msg)
                        except ProtocolError as e:  # a newer daemon may send more
                            log.debug("skipped an event: %s", e)
                            continue
                        self._on_event(event)
        except (OSError, ProtocolError) as e:
            log.debug("event reader stopped: %s", e)
        finally:
            self.alive = False
            for q in list(self._replies.values()):
                with contextlib.suppress(queue.Full):  # full: answered just before the end
                    q.put_nowait(None)
            if self._on_close is not None:
                self._on_close()

    def close(self) -> None:
        self.alive = False
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
