"""The typed wire messages: each one's map is exactly what the dict literals sent before the types
(so old and new clients and daemons interoperate), and validation refuses wrong types."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from ckptd import protocol as p
from ckptd.errors import ProtocolError
from ckptd.protocol import FrameReader, decode, encode, parse_event, parse_request

HEADER = b'{"__metadata__":{"format":"pt"}}  '
JOB = {"run": "r", "tag": "t", "part": None, "step": 1, "state": "uploading", "store": "s3://b",
       "bytes_total": 10, "bytes_written": 10, "bytes_uploaded": 4, "upload_rate": 1.5,
       "retries": 0, "error": None, "created": 1.0, "committed_at": 2.0, "uploaded_at": None}  # fmt: skip
MANIFEST = {"training_iteration": {"epoch": None, "update": 7, "sample": None},
            "model_config": {}, "torch_version": "2.13", "host": "h", "pid": 9,
            "metrics": {"val_loss": 0.5}}  # fmt: skip

# (typed message, the literal the code sent before the types: client.py, dcp.py, experiment.py,
# cli.py, execcmd.py, and the daemon's events in ckptd/daemon/)
REQUESTS: list[tuple[p.Request, dict[str, Any]]] = [
    (p.HelloRequest(rid=1, pid=9, run="r", store=None),
     {"op": "hello", "version": p.VERSION, "pid": 9, "run": "r", "store": None, "rid": 1}),
    (p.SlotRequest(slot=0, size=4096, generation=2),
     {"op": "slot", "slot": 0, "size": 4096, "generation": 2}),
    (p.SaveRequest(id=3, run="r", tag="step-00000007", step=7, store="s3://b", slot=1,
                   generation=2, files=[p.SaveFile(name="model.weights.safetensors",
                                                   header=HEADER, offset=0, size=16)],
                   inline={"extra.msgpack": b"\x80"}, manifest=MANIFEST),
     {"op": "save", "id": 3, "run": "r", "tag": "step-00000007", "step": 7, "store": "s3://b",
      "slot": 1, "generation": 2,
      "files": [{"name": "model.weights.safetensors", "header": HEADER, "offset": 0, "size": 16}],
      "inline": {"extra.msgpack": b"\x80"}, "manifest": MANIFEST}),
    (p.SaveRequest(id=4, run="r", tag="s", step=1, store=None, slot=0, generation=1, part=True,
                   files=[p.SaveFile(name="shard-00000-of-00002.safetensors", header=HEADER,
                                     offset=64, size=48, segments=[[64, 16], [128, 32]])]),
     {"op": "save", "id": 4, "run": "r", "tag": "s", "step": 1, "store": None, "slot": 0,
      "generation": 1, "part": True,
      "files": [{"name": "shard-00000-of-00002.safetensors", "header": HEADER, "offset": 64,
                 "size": 48, "segments": [[64, 16], [128, 32]]}]}),
    (p.StatusRequest(rid=5), {"op": "status", "rid": 5}),
    (p.DrainRequest(rid=6, timeout=5.0), {"op": "drain", "timeout": 5.0, "rid": 6}),
    (p.DrainRequest(rid=6), {"op": "drain", "timeout": None, "rid": 6}),
    (p.MirrorRequest(rid=7, run="r", dir="/x/exp", store=None, action="flush", timeout=0),
     {"op": "mirror", "run": "r", "dir": "/x/exp", "store": None, "action": "flush",
      "timeout": 0, "rid": 7}),
    (p.CommitRequest(rid=8, run="r", tag="s", step=1, store=None,
                     parts={"shard-00000-of-00001.safetensors": {"size": 9, "crc32c": "0a0b0c0d"}},
                     inline={"dcp-metadata.json": b"{}"},
                     manifest={"kind": "dcp", "world_size": 1, "training_iteration": {"update": 1},
                               "torch_version": "2.13"}),
     {"op": "commit", "run": "r", "tag": "s", "step": 1, "store": None,
      "parts": {"shard-00000-of-00001.safetensors": {"size": 9, "crc32c": "0a0b0c0d"}},
      "inline": {"dcp-metadata.json": b"{}"},
      "manifest": {"kind": "dcp", "world_size": 1, "training_iteration": {"update": 1},
                   "torch_version": "2.13"}, "rid": 8}),
    (p.ByeRequest(), {"op": "bye"}),
]  # fmt: skip

STATUS = {"pid": 1, "version": "0.1.0", "root": "/r", "socket": "/s", "store": None,
          "uptime": 3.5, "clients": 2, "closing": False, "preempted": False,
          "counts": {"uploading": 1}, "upload_queue": 1, "bytes_written": 10,
          "bytes_uploaded": 4, "store_retries": {},
          "store_capabilities": {"s3://b": {"create_only": False, "integrity": "etag-md5"}},
          "mirrors": {"r": ["main.log"]}, "jobs": [JOB],
          "summary": {"jobs": 3, "counts": {"uploaded": 3}, "bytes": 30, "since": 1.0},
          "connections": 3, "saves": 4, "failures": 0, "metrics": None}  # fmt: skip
EVENTS: list[tuple[p.Event, dict[str, Any]]] = [
    (p.Welcome(rid=1, version="0.1.0", root="/r", store="s3://b", pid=2, preempted=False,
               features=["mirror", "parts"]),
     {"ev": "welcome", "rid": 1, "version": "0.1.0", "root": "/r", "store": "s3://b", "pid": 2,
      "preempted": False, "features": ["mirror", "parts"]}),
    (p.Released(id=3, slot=1), {"ev": "released", "id": 3, "slot": 1}),
    (p.Released(id=3), {"ev": "released", "id": 3, "slot": None}),
    (p.Committed(id=3, tag="t", path="/r/x/checkpoints/t"),
     {"ev": "committed", "id": 3, "tag": "t", "path": "/r/x/checkpoints/t"}),
    (p.Committed(id=4, tag="t", path="/p", files={"a": {"size": 1, "crc32c": "00000000"}}),
     {"ev": "committed", "id": 4, "tag": "t", "path": "/p",
      "files": {"a": {"size": 1, "crc32c": "00000000"}}}),
    (p.Committed(rid=8, tag="t", path="/p"), {"ev": "committed", "rid": 8, "tag": "t", "path": "/p"}),
    (p.Uploaded(id=3), {"ev": "uploaded", "id": 3}),
    (p.Failed(id=3, error="disk full"), {"ev": "failed", "id": 3, "error": "disk full"}),
    (p.StatusReport(rid=5, **STATUS), {"ev": "status", "rid": 5, **STATUS}),
    (p.Drained(rid=6, ok=False, pending=[JOB]),
     {"ev": "drained", "rid": 6, "ok": False, "pending": [JOB]}),
    (p.Preempted(source="aws", detail="terminate"),
     {"ev": "preempted", "source": "aws", "detail": "terminate"}),
    (p.ErrorEvent(rid=2, error="bad"), {"ev": "error", "rid": 2, "error": "bad"}),
    (p.ErrorEvent(error="too many clients connected"),
     {"ev": "error", "error": "too many clients connected"}),
    (p.MirrorReport(rid=7, ok=True, active=True, pending=[], failed={}, skipped={"f": "fifo"}),
     {"ev": "mirror", "rid": 7, "ok": True, "active": True, "pending": [], "failed": {},
      "skipped": {"f": "fifo"}}),
]  # fmt: skip


def _through_frames(wire: dict[str, Any]) -> dict[str, Any]:
    reader = FrameReader()
    reader.feed(encode(wire))
    (msg,) = reader.messages()
    return msg


@pytest.mark.parametrize(("msg", "literal"), REQUESTS, ids=lambda x: getattr(x, "NAME", ""))
def test_requests_are_todays_literals(msg: p.Request, literal: dict[str, Any]) -> None:
    assert msg.to_wire() == literal
    assert decode(encode(msg.to_wire())[4:]) == decode(encode(literal)[4:])
    assert parse_request(_through_frames(literal)) == msg


@pytest.mark.parametrize(("msg", "literal"), EVENTS, ids=lambda x: getattr(x, "NAME", ""))
def test_events_are_todays_literals(msg: p.Event, literal: dict[str, Any]) -> None:
    wire = msg.to_wire()
    assert wire == {k: v for k, v in literal.items() if not (k == "rid" and v is None)}
    assert parse_event(_through_frames(literal)) == msg
    assert parse_event(_through_frames(wire)) == msg


def test_every_op_and_event_is_covered() -> None:
    assert set(p.REQUESTS) == {"hello", "slot", "save", "status", "drain", "mirror", "commit",
                               "bye"}  # fmt: skip
    assert set(p.EVENTS) == {"welcome", "released", "committed", "uploaded", "failed", "status",
                             "drained", "preempted", "error", "mirror"}  # fmt: skip
    assert {m.NAME for m, _ in REQUESTS} == set(p.REQUESTS)
    assert {m.NAME for m, _ in EVENTS} == set(p.EVENTS)


def test_older_and_newer_peers() -> None:
    """Fields added later are optional, and keys a newer peer adds are ignored."""
    # ckptd.dcp's reader once said hello without run/store; hostile clients without a version.
    assert parse_request({"op": "hello", "version": 1, "pid": 3}) == p.HelloRequest(pid=3)
    assert parse_request({"op": "hello", "rid": 1, "run": "a", "pid": 1}).run == "a"
    old = {"ev": "welcome", "rid": 1, "version": "0.0.9", "root": "/r", "store": None, "pid": 2}
    assert parse_event(old) == p.Welcome(rid=1, version="0.0.9", root="/r", pid=2)
    assert parse_event({**old, "shiny": [1]}) == parse_event(old)
    save = parse_request({"op": "save", "id": 1, "run": "r", "tag": "t", "step": 1, "files": []})
    assert isinstance(save, p.SaveRequest) and save.slot is None and not save.part
    assert parse_request({"op": "drain", "timeout": 5}) == p.DrainRequest(timeout=5)
    # A status from a daemon before the summary (and its siblings) still parses.
    added = ("summary", "connections", "saves", "failures", "metrics")
    before = {k: v for k, v in STATUS.items() if k not in added}
    report = parse_event({"ev": "status", **before})
    assert isinstance(report, p.StatusReport) and report.summary is None and report.jobs == [JOB]


BAD_REQUESTS = [
    {"op": 3},
    {"op": "nope"},
    {"no": "op"},
    {"op": "drain", "timeout": "soon"},
    {"op": "drain", "timeout": True},
    {"op": "slot", "slot": "0", "size": 1, "generation": 1},
    {"op": "slot", "slot": 0, "size": 1},
    {"op": "save", "id": True, "run": "r", "tag": "t", "step": 1, "files": []},
    {"op": "save", "id": 1, "run": "r", "tag": "t", "step": 1, "files": {}},
    {"op": "save", "id": 1, "run": "r", "tag": "t", "step": 1, "files": ["x"]},
    {"op": "save", "id": 1, "run": "r", "tag": "t", "step": 1, "part": "yes", "files": []},
    {"op": "save", "id": 1, "run": "r", "tag": "t", "step": 1,
     "files": [{"name": "a", "header": "not bytes", "offset": 0, "size": 1}]},
    {"op": "save", "id": 1, "run": "r", "tag": "t", "step": 1,
     "files": [{"name": "a", "header": b"", "offset": 0, "size": 1, "segments": [[0, 1, 2]]}]},
    {"op": "save", "id": 1, "run": "r", "tag": "t", "step": 1,
     "files": [{"name": "a", "header": b"", "offset": 0, "size": 1, "segments": [[0, "1"]]}]},
    {"op": "save", "id": 1, "run": "r", "tag": "t", "step": 1, "files": [],
     "inline": {"extra.msgpack": "str"}},
    {"op": "save", "id": 1, "run": "r", "tag": "t", "step": 1, "files": [], "inline": {1: b""}},
    {"op": "mirror", "run": 1, "dir": "/d"},
    {"op": "commit", "run": "r", "tag": "t", "step": 1, "parts": {"a": 1}},
    {"op": "hello", "pid": "me"},
]  # fmt: skip


@pytest.mark.parametrize("msg", BAD_REQUESTS, ids=str)
def test_wrong_types_are_protocol_errors(msg: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        parse_request(msg)


def test_bad_events_are_protocol_errors() -> None:
    for msg in ({"ev": "nope"}, {"ev": "failed", "id": 1}, {"ev": "released", "id": "1"},
                {"ev": "drained", "ok": 1, "pending": []}):  # fmt: skip
        with pytest.raises(ProtocolError):
            parse_event(msg)


def test_protocol_imports_no_torch() -> None:
    """The daemon parses requests with this module; it must stay light."""
    code = "import sys, ckptd.protocol; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
