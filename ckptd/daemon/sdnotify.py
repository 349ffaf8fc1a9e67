"""systemd's notify protocol, spoken directly: one datagram to ``$NOTIFY_SOCKET`` (no libsystemd)."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("ckptd.sdnotify")


def notify(*fields: str) -> bool:
    """Send ``READY=1``, ``STOPPING=1``, ``EXTEND_TIMEOUT_USEC=...``, ``WATCHDOG=1``, ``STATUS=...``.

    Returns False (and does nothing) when not run under systemd with ``Type=notify``.
    """
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall("\n".join(fields).encode())
        return True
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", addr, e)
        return False


def watchdog_interval() -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, when systemd asked this process for keep-alives."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None
