"""The client <-> daemon wire format: length-prefixed msgpack maps on a Unix stream socket.

A frame is a 4-byte big-endian length and a msgpack map. The only frame that carries a file
descriptor (SCM_RIGHTS, sent with the frame's first byte) is ``{"op": "slot"}``. Everything a
client sends is validated by the daemon before use (``field``); a frame that is too big, not a map,
or has wrong types is a ``ProtocolError`` that drops that connection alone.

Client -> daemon ops: ``hello``, ``slot`` (+fd), ``save``, ``status``, ``drain``, ``mirror``,
``commit``, ``bye``. A ``save`` with ``part: true`` is one rank's file of a sharded (DCP)
checkpoint; its data may be gathered from ``segments`` of the slot. ``commit`` lists every part
of a sharded checkpoint and asks for the metadata and manifest to be written (``ckptd.dcp``).
Daemon -> client events: ``welcome``, ``released``, ``committed``, ``uploaded``, ``failed``,
``status``, ``drained``, ``preempted``, ``error``.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any, TypeVar

import msgpack

from .errors import ProtocolError

VERSION = 1
MAX_FRAME = 64 << 20
MAX_FDS_QUEUED = 16
_LEN = struct.Struct(">I")
T = TypeVar("T")


def encode(msg: dict[str, Any]) -> bytes:
    payload = msgpack.packb(msg, use_bin_type=True)
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds the {MAX_FRAME} byte limit")
    return _LEN.pack(len(payload)) + payload


class FrameReader:
    """Incremental decoder: feed bytes (and received fds), take complete messages."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self.fds: deque[int] = deque()
        self.max_frame = max_frame

    def feed(self, data: bytes, fds: list[int] | None = None) -> None:
        self._buf += data
        if fds:
            self.fds.extend(fds)
            if len(self.fds) > MAX_FDS_QUEUED:
                raise ProtocolError("too many file descriptors sent without slot messages")

    def messages(self) -> list[dict[str, Any]]:
        out = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if n > self.max_frame:
                raise ProtocolError(f"frame of {n} bytes exceeds the {self.max_frame} byte limit")
            if len(self._buf) < 4 + n:
                break
            payload = bytes(self._buf[4 : 4 + n])
            del self._buf[: 4 + n]
            out.append(decode(payload))
        return out

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)


def decode(payload: bytes) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ProtocolError(f"undecodable message: {e}") from e
    if not isinstance(msg, dict):
        raise ProtocolError(f"message is a {type(msg).__name__}, not a map")
    return msg


def field(
    msg: dict[str, Any], key: str, kind: type[T] | tuple[type, ...], *, optional: bool = False
) -> T:
    """Typed access to a message field; wrong or missing types are a ProtocolError."""
    if key not in msg or msg[key] is None:
        if optional:
            return None  # type: ignore[return-value]
        raise ProtocolError(f"message {msg.get('op', '?')!r} lacks field {key!r}")
    value = msg[key]
    if isinstance(value, bool) and kind in (int, float):
        raise ProtocolError(f"field {key!r} must be {kind}, not bool")
    if not isinstance(value, kind):
        raise ProtocolError(f"field {key!r} must be {kind}, not {type(value).__name__}")
    return value  # type: ignore[return-value]
