"""Raw-socket helpers for the tests that play a hostile or careless client of a real daemon."""

from __future__ import annotations

import socket
from typing import Any

import msgpack

from ckptd import Checkpointer
from tests.helpers import Net

__all__ = ["honest_save", "raw_socket", "read_events"]


def raw_socket(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def read_events(s: socket.socket, want: str, timeout: float = 20) -> list[dict[str, Any]]:
    """Read frames until one has ``ev == want`` (or EOF); returns all read."""
    s.settimeout(timeout)
    buf, out = b"", []
    while True:
        try:
            chunk = s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            return out
        if not chunk:
            return out
        buf += chunk
        while len(buf) >= 4 and len(buf) >= 4 + (n := int.from_bytes(buf[:4], "big")):
            out.append(msgpack.unpackb(buf[4 : 4 + n], raw=False))
            buf = buf[4 + n :]
            if out[-1].get("ev") == want:
                return out


def honest_save(sock: str, run: str = "bystander") -> None:
    with Checkpointer(run, socket=sock) as ckpt:
        ckpt.save(1, model=Net()).wait(timeout=30)
