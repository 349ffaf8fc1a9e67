"""A fuzzer for the socket protocol: mutated messages give typed errors, never a crash.

In-process, seeded and bounded: valid requests and events are mutated (fields dropped, retyped,
nested wrongly, renamed) and parsed as the daemon and the client parse them; then a sample of
the mutated frames goes to a real daemon, which must keep serving an honest client.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
from typing import Any

import pytest

from ckptd.daemon.write import parse_save
from ckptd.errors import CkptdError
from ckptd.protocol import SaveRequest, encode, parse_event, parse_request
from tests.clientkit import honest_save, raw_socket

SAVE = {"op": "save", "id": 1, "run": "r", "tag": "t", "step": 1, "slot": 0, "generation": 1,
        "files": [{"name": "model.weights.safetensors", "header": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
                   "offset": 0, "size": 0, "segments": [[0, 0]]}],
        "inline": {"extra.msgpack": b"\x80"}, "manifest": {"metrics": {"loss": 1.0}}}  # fmt: skip
REQUESTS: list[dict[str, Any]] = [
    {"op": "hello", "rid": 1, "pid": 3, "run": "a/b", "store": "memory://x", "version": 1},
    {"op": "slot", "slot": 0, "size": 4096, "generation": 1},
    SAVE,
    {"op": "status", "rid": 2},
    {"op": "drain", "rid": 3, "timeout": 1.5},
    {"op": "mirror", "rid": 4, "run": "r", "dir": "/tmp/x", "action": "flush", "timeout": 0},
    {"op": "commit", "rid": 5, "run": "r", "tag": "t", "step": 1,
     "parts": {"shard-0-of-1.safetensors": {"size": 8, "crc32c": "00000000"}}},
]  # fmt: skip
EVENTS: list[dict[str, Any]] = [
    {"ev": "welcome", "rid": 1, "version": "0.1.0", "root": "/r", "pid": 2, "features": ["x"]},
    {"ev": "released", "id": 1, "slot": 0},
    {"ev": "committed", "id": 1, "tag": "t", "path": "/p", "files": {"a": {"size": 1}}},
    {"ev": "failed", "id": 1, "error": "x"},
    {"ev": "drained", "rid": 3, "ok": False, "pending": [{"tag": "t"}]},
]
ODD: list[Any] = [None, True, -1, 2**70, 1.5, float("nan"), "", "x" * 300, "../x", "a\n", b"\x00",
                  [], [1, [2, [3]]], {}, {"k": {"k": {}}}, "memory://x"]  # fmt: skip


def _mutate(msg: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    out = copy.deepcopy(msg)
    for _ in range(rng.randint(1, 3)):
        target = out
        keys = list(target)
        # sometimes go one level down (files entries, nested maps)
        if rng.random() < 0.3:
            nested = [k for k in keys if isinstance(target[k], dict | list) and target[k]]
            if nested:
                inner = target[rng.choice(nested)]
                if isinstance(inner, list):
                    inner = inner[0] if isinstance(inner[0], dict) else {}
                if isinstance(inner, dict) and inner:
                    target, keys = inner, list(inner)
        if not keys:
            continue
        key = rng.choice(keys)
        action = rng.random()
        if action < 0.2:
            del target[key]
        elif action < 0.3:
            target[key + "x"] = target.pop(key)
        else:
            target[key] = rng.choice(ODD)
    return out


class _Client:
    id = 1
    store = None

    def __init__(self, fd: int) -> None:
        self.slots = {0: (fd, 4096, 1)}


@pytest.mark.parametrize("seed", range(4))
def test_mutated_requests_and_events_raise_typed_errors_only(seed: int) -> None:
    rng = random.Random(seed)
    fd = os.memfd_create("slot")
    os.ftruncate(fd, 4096)
    client = _Client(fd)
    try:
        for _ in range(250):
            msg = _mutate(rng.choice(REQUESTS), rng)
            with contextlib.suppress(CkptdError):
                req = parse_request(msg)
                if isinstance(req, SaveRequest):
                    parse_save(client, req, None).close()  # type: ignore[arg-type]
            with contextlib.suppress(CkptdError):
                parse_event(_mutate(rng.choice(EVENTS), rng))
    finally:
        os.close(fd)


def test_a_daemon_survives_mutated_frames(daemon, fault_log) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(99)
    sent = 0
    for _ in range(60):
        s = raw_socket(daemon.socket)
        try:
            for _ in range(3):
                msg = _mutate(rng.choice([r for r in REQUESTS if r["op"] != "slot"]), rng)
                try:
                    frame = encode(msg)
                except (CkptdError, TypeError, ValueError, OverflowError):
                    continue  # not even encodable: nothing a client could send
                s.sendall(frame)
                sent += 1
        except OSError:
            pass  # the daemon dropped this client: allowed
        finally:
            s.close()
    assert daemon.proc.proc.poll() is None, daemon.log_text()
    honest_save(daemon.socket)
    fault_log("protocol fuzz: mutated requests over real sockets", sent, 1, 0)
