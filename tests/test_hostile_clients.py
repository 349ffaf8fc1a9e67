"""Hostile or careless clients, against the real daemon process.

Each case ends in a clear error for the client at fault and nothing lost for anyone else: a
client that shrinks its slot, a refused hello, a second trainer on one run, a failure nobody
waited for, a daemon restarted under a live trainer. Other local users are in
``test_local_users.py``, exhaustion in ``test_exhaustion.py``.
"""

from __future__ import annotations

import os
import socket

import pytest

import ckptd
from ckptd import Checkpointer
from ckptd.header import encode_header
from ckptd.protocol import encode
from ckptd.spawn import socket_ready
from tests.clientkit import honest_save, raw_socket, read_events
from tests.helpers import Net, until


def test_a_slot_that_shrinks_fails_that_save_and_nothing_else(daemon, fault_log) -> None:  # type: ignore[no-untyped-def]
    """Before: the daemon mapped the slot and died of SIGBUS, taking every client's pending
    checkpoint with it. Now it reads with pread: only the shrinking client's save fails."""
    size = 8 << 20
    fd = os.memfd_create("slot")
    os.ftruncate(fd, size)
    s = raw_socket(daemon.socket)
    socket.send_fds(s, [encode({"op": "slot", "slot": 0, "size": size, "generation": 1})], [fd])
    s.sendall(encode({"op": "status", "rid": 1}))
    assert read_events(s, "status")  # the daemon holds the slot now
    os.ftruncate(fd, 0)  # the client takes its memory back before the daemon reads it
    header = encode_header({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}})
    s.sendall(encode({"op": "save", "id": 7, "run": "shrinker", "tag": "t", "step": 1, "slot": 0,
                      "generation": 1,
                      "files": [{"name": "model.weights.safetensors", "header": header,
                                 "offset": 0, "size": size}]}))  # fmt: skip
    events = read_events(s, "failed")
    s.close()
    os.close(fd)
    assert events and events[-1]["ev"] == "failed" and "shrank" in events[-1]["error"], events
    assert daemon.proc.proc.poll() is None, daemon.log_text()
    honest_save(daemon.socket)
    assert not os.path.exists(os.path.join(daemon.root, "shrinker", "checkpoints", "t"))
    fault_log("hostile client: slot shrunk during the write", 1, 1, 0)


def test_a_refused_hello_is_answered(daemon) -> None:  # type: ignore[no-untyped-def]
    """Before: an invalid name in hello dropped the connection with no word."""
    s = raw_socket(daemon.socket)
    s.sendall(encode({"op": "hello", "rid": 1, "run": "a/../../b", "pid": 1}))
    events = read_events(s, "error")
    s.close()
    assert events and events[-1]["ev"] == "error" and events[-1]["rid"] == 1
    assert "invalid run" in events[-1]["error"]
    honest_save(daemon.socket)


def test_a_second_live_writer_on_a_run_is_refused_naming_the_holder(daemon) -> None:  # type: ignore[no-untyped-def]
    """Before: two trainers on one run both exited 0 while half the saves were dropped."""
    with Checkpointer("shared", socket=daemon.socket) as first:
        first.save(1, model=Net()).wait(timeout=30)
        second = Checkpointer("shared", socket=daemon.socket)
        with pytest.raises(ckptd.SaveError, match="live writer"):
            second.save(2, model=Net()).wait(timeout=30)
        first.save(3, model=Net()).wait(timeout=30)
        refused = second.save(4, model=Net())  # nobody waits on this one...
        until(lambda: refused.state == "failed", 30, "the refusal")
        with pytest.raises(ckptd.SaveError, match=f"pid {os.getpid()}"):
            second.save(5, model=Net())  # ...so the next save raises it, not only close()
        second._closed = True  # its failures were reported; nothing of it is pending
        second._conn.close()  # type: ignore[union-attr]
    with Checkpointer("shared", socket=daemon.socket) as third:  # the run is free again
        third.save(6, model=Net()).wait(timeout=30)
    tags = [c["tag"] for c in ckptd.list_checkpoints(os.path.join(daemon.root, "shared"))]
    assert sorted(tags) == ["step-00000001", "step-00000003", "step-00000006"]


def test_an_unreported_failure_raises_at_the_next_save(daemon) -> None:  # type: ignore[no-untyped-def]
    with Checkpointer("twice", socket=daemon.socket) as ckpt:
        ckpt.save(1, model=Net(), tag="fixed").wait(timeout=30)
        ckpt.save(2, model=Net(), tag="fixed")  # collides; nobody waits on it
        until(lambda: bool(ckpt._unreported), 30, "the collision to come back")
        with pytest.raises(ckptd.SaveError, match="already exists"):
            ckpt.save(3, model=Net())
        ckpt.save(4, model=Net()).wait(timeout=30)  # reported once, then saving goes on


def test_a_restarted_daemon_costs_a_live_trainer_at_most_its_in_flight_saves(daemon) -> None:  # type: ignore[no-untyped-def]
    """The daemon restarts (systemd after a crash) under a training loop: the loop is not
    crashed; its next save reconnects and commits."""
    with Checkpointer("live", socket=daemon.socket) as ckpt:
        ckpt.save(1, model=Net()).wait(timeout=30)
        daemon.restart()
        until(lambda: socket_ready(daemon.socket), 60, "the restarted daemon")
        until(lambda: not ckpt._conn.alive, 30, "the client to see the old daemon go")  # type: ignore[union-attr]
        ckpt.save(2, model=Net()).wait(timeout=30)
    tags = [c["tag"] for c in ckptd.list_checkpoints(os.path.join(daemon.root, "live"))]
    assert tags == ["step-00000001", "step-00000002"]
