"""The socket to the daemon: framed requests and a reader thread for events. No torch."""

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
from collections.abc import Callable
from typing import Any

from .errors import DaemonUnavailableError, ProtocolError
from .protocol import FrameReader, encode

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
    """The socket to the daemon, with a reader thread that routes events to handlers."""

    def __init__(
        self, path: str, timeout: float, on_event: Callable[[dict[str, Any]], None]
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
        self.alive = True
        self._replies: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._rids = itertools.count(1)
        self._thread = threading.Thread(target=self._read_loop, name="ckptd-events", daemon=True)
        self._thread.start()

    def send(self, msg: dict[str, Any], fd: int | None = None) -> None:
        frame = encode(msg)
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

    def request(self, msg: dict[str, Any], timeout: float | None = 30.0) -> dict[str, Any]:
        rid = next(self._rids)
        q: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=1)
        self._replies[rid] = q
        try:
            self.send({**msg, "rid": rid})
            try:
                return q.get(timeout=timeout)
            except queue.Empty:
                raise DaemonUnavailableError(
                    f"the daemon at {self.path} did not answer {msg['op']!r}"
                ) from None
        finally:
            self._replies.pop(rid, None)

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
                    if isinstance(rid, int) and rid in self._replies:
                        self._replies[rid].put(msg)
                    else:
                        self._on_event(msg)
        except (OSError, ProtocolError) as e:
            log.debug("event reader stopped: %s", e)
        finally:
            self.alive = False
            self._on_event({"ev": "disconnected"})

    def close(self) -> None:
        self.alive = False
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
