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
``status``, ``drained``, ``preempted``, ``error``, ``mirror``.

Each op and event is a typed message below (``HelloRequest`` ... ``MirrorReport``), the one
definition of its keys and value types: ``to_wire()`` gives the map, ``from_wire(map)`` validates
one, ``parse_request``/``parse_event`` pick the type by ``op``/``ev``. Frames stay plain maps, so
peers of other versions interoperate: unknown keys are ignored, and fields added later are
optional. This module imports no torch (the daemon uses it too).
"""

from __future__ import annotations

import dataclasses
import struct
from collections import deque
from dataclasses import MISSING
from types import NoneType, UnionType
from typing import Any, ClassVar, Self, TypeVar, Union, get_args, get_origin, get_type_hints

import msgpack

from .blobs import is_digest
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
        name = msg.get("op", msg.get("ev", "?"))
        raise ProtocolError(f"message {name!r} lacks field {key!r}")
    value = msg[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds and (int in kinds or float in kinds):
        raise ProtocolError(f"field {key!r} must be {_name(kind)}, not bool")
    if not isinstance(value, kind):
        raise ProtocolError(f"field {key!r} must be {_name(kind)}, not {type(value).__name__}")
    return value  # type: ignore[return-value]


def _name(kind: Any) -> str:
    if isinstance(kind, tuple):
        return " or ".join(_name(k) for k in kind)
    return kind.__name__ if isinstance(kind, type) else str(kind)


# ---- typed messages ------------------------------------------------------------------------------


def _kinds(hint: Any) -> type | tuple[type, ...]:
    """What ``isinstance`` checks for a field's outer type (a float field takes ints too: msgpack
    keeps ``5`` an int)."""
    origin = get_origin(hint) or hint
    if origin is float:
        return (int, float)
    if isinstance(origin, type):
        return origin
    raise TypeError(f"unsupported wire type {hint!r}")


def _convert(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against ``hint`` all the way down; nested messages are built."""
    if hint is Any:
        return value
    if get_origin(hint) in (Union, UnionType):
        args = [a for a in get_args(hint) if a is not NoneType]
        if value is None and len(args) < len(get_args(hint)):
            return None
        if len(args) != 1:
            raise TypeError(f"unsupported wire type {hint!r}")
        hint = args[0]
    kinds = _kinds(hint)
    if value is None or (isinstance(value, bool) and kinds is not bool):
        raise ProtocolError(f"{where} must be {_name(hint)}, not {type(value).__name__}")
    if isinstance(hint, type) and issubclass(hint, _Wire):
        if not isinstance(value, dict):
            raise ProtocolError(f"{where} must be a map, not {type(value).__name__}")
        return hint.from_wire(value)
    if not isinstance(value, kinds):
        raise ProtocolError(f"{where} must be {_name(hint)}, not {type(value).__name__}")
    args = get_args(hint)
    if get_origin(hint) is list and args:
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if get_origin(hint) is dict and args:
        return {
            _convert(k, args[0], f"a key of {where}"): _convert(v, args[1], f"{where}[{k!r}]")
            for k, v in value.items()
        }
    return value


_OMIT = {"omit": True}
"""Field metadata: leave the key out of the wire map while the field holds its default (the key
did not exist when the field was added, like ``part``, or the message never carried it, like
``rid`` outside a request/reply)."""


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = get_type_hints(cls)
    return hints


def _plain(value: Any) -> Any:
    if isinstance(value, _Wire):
        return value.to_wire()
    if isinstance(value, list) and value and isinstance(value[0], _Wire):
        return [v.to_wire() for v in value]
    return value


@dataclasses.dataclass(kw_only=True, slots=True)
class _Wire:
    """A map on the wire; ``to_wire``/``from_wire`` follow the field annotations."""

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not (f.metadata.get("omit") and value == f.default):
                out[f.name] = _plain(value)
        return out

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> Self:
        """Validate ``msg`` (a decoded map) into this type. Keys it does not know are ignored (a
        newer peer may send more); a missing or None key takes the field's default; wrong types
        are a ``ProtocolError``."""
        hints = _hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            nullable = get_origin(hint) in (Union, UnionType) and NoneType in get_args(hint)
            has_default = f.default is not MISSING or f.default_factory is not MISSING
            if msg.get(f.name) is None:
                if nullable and not has_default:
                    values[f.name] = None
                elif not (nullable or has_default):
                    field(msg, f.name, object)  # raises: a required field is missing
                continue
            outer = next(a for a in get_args(hint) if a is not NoneType) if nullable else hint
            value = field(msg, f.name, _kinds(outer))
            values[f.name] = _convert(value, hint, f"field {f.name!r}")
        out = cls(**values)
        out._validate()
        return out

    def _validate(self) -> None:
        """Checks beyond types that the message itself implies (not the daemon's rules)."""


@dataclasses.dataclass(kw_only=True, slots=True)
class Message(_Wire):
    """One frame: ``KEY`` (``op`` or ``ev``) names its type; ``rid`` pairs a reply with its
    request (``Connection.request`` sets it)."""

    KEY: ClassVar[str]
    NAME: ClassVar[str]

    rid: int | None = dataclasses.field(default=None, metadata=_OMIT)

    def to_wire(self) -> dict[str, Any]:
        return {self.KEY: self.NAME, **_Wire.to_wire(self)}


@dataclasses.dataclass(kw_only=True, slots=True)
class Request(Message):
    """What a client sends."""

    KEY: ClassVar[str] = "op"


@dataclasses.dataclass(kw_only=True, slots=True)
class Event(Message):
    """What the daemon sends: replies (with the request's ``rid``) and notices."""

    KEY: ClassVar[str] = "ev"


# -- client -> daemon -----------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True, slots=True)
class HelloRequest(Request):
    """First message of a connection; answered by ``Welcome`` (or ``ErrorEvent``)."""

    NAME: ClassVar[str] = "hello"
    version: int = VERSION
    pid: int | None = None
    run: str | None = None
    """The run this client saves into (checked by the daemon's name rule)."""
    store: str | None = None
    """The client's store URL; None: the daemon's."""


@dataclasses.dataclass(kw_only=True, slots=True)
class SlotRequest(Request):
    """Hands the daemon a staging slot's memory file; sent with the fd (SCM_RIGHTS)."""

    NAME: ClassVar[str] = "slot"
    slot: int
    size: int
    generation: int
    """Bumped each time the slot's memory is replaced; a save names the one it was staged in."""


@dataclasses.dataclass(kw_only=True, slots=True)
class SaveFile(_Wire):
    """One staged file: its safetensors header inline, its data section in the slot."""

    name: str
    header: bytes
    offset: int
    size: int
    segments: list[list[int]] | None = dataclasses.field(default=None, metadata=_OMIT)
    """``[offset, size]`` pairs that gather a part's data from the slot; None: one run at
    ``offset``."""
    dedup: bool = dataclasses.field(default=False, metadata=_OMIT)
    """The client expects the bytes to be stored already (frozen, or unchanged since its last
    save): the daemon hashes them and links the run's copy if it has one."""
    blob: str | None = dataclasses.field(default=None, metadata=_OMIT)
    """Not staged: the client proved the file unchanged since a save whose ``committed``
    named this blob (a content digest) for it."""

    def _validate(self) -> None:
        if any(len(seg) != 2 for seg in self.segments or ()):
            raise ProtocolError(f"{self.name}: segments must be [offset, size] pairs")
        if self.blob is not None and not is_digest(self.blob):
            raise ProtocolError(f"{self.name}: blob {self.blob!r} is not a content digest")


@dataclasses.dataclass(kw_only=True, slots=True)
class SaveRequest(Request):
    """A staged checkpoint (or, with ``part``, one rank's file of a sharded one).

    Answered by ``Released`` (slot free), ``Committed``, ``Uploaded`` or ``Failed``, all keyed by
    ``id``. A part carries exactly one file and no ``inline``/``manifest``.
    """

    NAME: ClassVar[str] = "save"
    id: int
    run: str
    tag: str
    step: int
    store: str | None = None
    slot: int | None = None
    generation: int | None = None
    part: bool = dataclasses.field(default=False, metadata=_OMIT)
    files: list[SaveFile]
    inline: dict[str, bytes] | None = dataclasses.field(default=None, metadata=_OMIT)
    """Small files sent in the message itself (``extra.msgpack``)."""
    manifest: dict[str, Any] | None = dataclasses.field(default=None, metadata=_OMIT)
    """Fields the client adds to MANIFEST.json (training_iteration, model_config, metrics...)."""


@dataclasses.dataclass(kw_only=True, slots=True)
class StatusRequest(Request):
    """Answered by ``StatusReport``."""

    NAME: ClassVar[str] = "status"


@dataclasses.dataclass(kw_only=True, slots=True)
class DrainRequest(Request):
    """Answered by ``Drained`` once nothing is pending or after ``timeout`` seconds."""

    NAME: ClassVar[str] = "drain"
    timeout: float | None = None


@dataclasses.dataclass(kw_only=True, slots=True)
class MirrorRequest(Request):
    """Mirror an experiment folder to ``<store>/<run>/experiment``; answered by ``MirrorReport``.

    ``action``: ``start`` (idempotent), ``flush`` (upload what is pending within ``timeout``;
    0: do not wait) or ``stop`` (flush, stop watching); the daemon checks the value.
    """

    NAME: ClassVar[str] = "mirror"
    run: str
    dir: str
    store: str | None = None
    action: str = "start"
    timeout: float | None = None


@dataclasses.dataclass(kw_only=True, slots=True)
class CommitRequest(Request):
    """The global commit of a sharded checkpoint: every part with its size and checksum, the
    metadata files inline, then MANIFEST.json. Answered by ``Committed`` or ``ErrorEvent``."""

    NAME: ClassVar[str] = "commit"
    run: str
    tag: str
    step: int
    store: str | None = None
    parts: dict[str, dict[str, Any]]
    """File name -> ``{"size": int, "crc32c": str}``."""
    inline: dict[str, bytes] | None = None
    manifest: dict[str, Any] | None = None


@dataclasses.dataclass(kw_only=True, slots=True)
class ByeRequest(Request):
    """The client is done; the daemon closes the connection."""

    NAME: ClassVar[str] = "bye"


# -- daemon -> client -----------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True, slots=True)
class Welcome(Event):
    """The answer to ``hello``: where the daemon keeps things and what it can do."""

    NAME: ClassVar[str] = "welcome"
    version: str
    """The daemon's package version (``ckptd.__version__``)."""
    root: str
    store: str | None = None
    pid: int
    preempted: bool = False
    features: list[str] = dataclasses.field(default_factory=list)
    """Ops newer than the first protocol: ``mirror``, ``parts``."""


@dataclasses.dataclass(kw_only=True, slots=True)
class Released(Event):
    """The daemon is done reading save ``id``'s slot: the client may reuse it."""

    NAME: ClassVar[str] = "released"
    id: int
    slot: int | None = None


@dataclasses.dataclass(kw_only=True, slots=True)
class Committed(Event):
    """Save ``id`` is on the daemon's disk (or, with ``rid``, a ``commit`` is done)."""

    NAME: ClassVar[str] = "committed"
    id: int | None = dataclasses.field(default=None, metadata=_OMIT)
    tag: str
    path: str
    files: dict[str, dict[str, Any]] | None = dataclasses.field(default=None, metadata=_OMIT)
    """For a part: file name -> ``{"size", "crc32c"}`` as written, for the later commit."""
    blobs: dict[str, str] | None = dataclasses.field(default=None, metadata=_OMIT)
    """File name -> content digest, for the files stored as the run's shared blobs: what a
    later save may refer to instead of staging them again (``SaveFile.blob``)."""


@dataclasses.dataclass(kw_only=True, slots=True)
class Uploaded(Event):
    """Save ``id`` is in its store (or committed to a root that is the store)."""

    NAME: ClassVar[str] = "uploaded"
    id: int


@dataclasses.dataclass(kw_only=True, slots=True)
class Failed(Event):
    """Save ``id`` failed for good."""

    NAME: ClassVar[str] = "failed"
    id: int
    error: str


@dataclasses.dataclass(kw_only=True, slots=True)
class StatusReport(Event):
    """The answer to ``status`` (``ckptd status --json`` prints these fields in this order)."""

    NAME: ClassVar[str] = "status"
    pid: int
    version: str
    root: str
    socket: str
    store: str | None = None
    uptime: float
    clients: int
    closing: bool
    preempted: bool
    counts: dict[str, int]
    upload_queue: int
    bytes_written: int
    bytes_uploaded: int
    bytes_deduped: int = dataclasses.field(default=0, metadata=_OMIT)
    """Bytes of saves that the root or the store held already (linked, not written again)."""
    store_retries: dict[str, int] = dataclasses.field(default_factory=dict)
    """Request retries each store made so far (the stores' own retry layer)."""
    store_capabilities: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Per store URL: what its probe found (``ckptd.storage.capabilities``), with the gaps."""
    mirrors: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    jobs: list[dict[str, Any]]
    """Every checkpoint in progress and the last few finished (``Job.as_dict``), oldest first."""
    summary: dict[str, Any] | None = None
    """The finished checkpoints ``jobs`` leaves out: ``jobs``, ``counts`` by phase, ``bytes``,
    ``since`` (docs/status.md). None from a daemon older than the field."""
    connections: int | None = None
    """Every connection, ``status`` askers included (``clients`` counts training processes)."""
    saves: int | None = None
    failures: int | None = None
    metrics: str | None = None
    """The metrics endpoint's URL, when ``serve --metrics-port`` runs one."""


@dataclasses.dataclass(kw_only=True, slots=True)
class Drained(Event):
    """The answer to ``drain``: ``ok`` when nothing is pending; else the jobs left."""

    NAME: ClassVar[str] = "drained"
    ok: bool
    pending: list[dict[str, Any]]


@dataclasses.dataclass(kw_only=True, slots=True)
class Preempted(Event):
    """The machine is going away (a spot/preemption notice): save now if you can."""

    NAME: ClassVar[str] = "preempted"
    source: str
    detail: str


@dataclasses.dataclass(kw_only=True, slots=True)
class ErrorEvent(Event):
    """A request was refused (its ``rid``), or the daemon drops this client (no ``rid``)."""

    NAME: ClassVar[str] = "error"
    error: str


@dataclasses.dataclass(kw_only=True, slots=True)
class MirrorReport(Event):
    """The answer to ``mirror``; ``active`` is False when the folder already lies in the store."""

    NAME: ClassVar[str] = "mirror"
    ok: bool
    active: bool
    pending: list[str]
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    """Paths never mirrored (symlinks, FIFOs, bad names, over the cap) -> why."""


REQUESTS: dict[str, type[Request]] = {
    c.NAME: c
    for c in (HelloRequest, SlotRequest, SaveRequest, StatusRequest, DrainRequest,
              MirrorRequest, CommitRequest, ByeRequest)
}  # fmt: skip
EVENTS: dict[str, type[Event]] = {
    c.NAME: c
    for c in (Welcome, Released, Committed, Uploaded, Failed, StatusReport, Drained, Preempted,
              ErrorEvent, MirrorReport)
}  # fmt: skip


def parse_request(msg: dict[str, Any]) -> Request:
    """A decoded client message as its typed request; unknown ops and wrong types are a
    ``ProtocolError`` (the daemon drops that connection alone)."""
    op = field(msg, "op", str)
    cls = REQUESTS.get(op)
    if cls is None:
        raise ProtocolError(f"unknown op {op!r}")
    return cls.from_wire(msg)


def parse_event(msg: dict[str, Any]) -> Event:
    """A decoded daemon message as its typed event; unknown events are a ``ProtocolError``
    (a client skips them: a newer daemon may send more)."""
    ev = field(msg, "ev", str)
    cls = EVENTS.get(ev)
    if cls is None:
        raise ProtocolError(f"unknown event {ev!r}")
    return cls.from_wire(msg)
