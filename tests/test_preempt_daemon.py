"""Preemption end to end: a fake metadata service, the real daemon, a client, a real S3 server."""

from __future__ import annotations

import asyncio
import threading

import torch

import ckptd
from ckptd import Checkpointer
from tests.test_preempt import FakeMetadata


class _Served:
    """FakeMetadata on its own event loop thread, so sync test code can block freely."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.md = FakeMetadata(gce=False)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.md.start(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.md.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_notice_tells_clients_and_uploads_newest_first(
    s3_proxy, s3_bucket, make_daemon, fault_log
) -> None:  # type: ignore[no-untyped-def]
    served = _Served()
    try:
        d = make_daemon(
            store=f"s3://{s3_bucket}/pre",
            args=["--preemption", "aws", "--aws-metadata-url", served.md.url,
                  "--preemption-poll", "0.1", "--uploads", "1"],
        )  # fmt: skip
        s3_proxy.down()  # uploads wait: a backlog builds up, as on a slow link
        called = threading.Event()
        with Checkpointer("spot", socket=d.socket, on_preempt=called.set) as ckpt:
            handles = [ckpt.save(s, model=torch.nn.Linear(32, 32)) for s in (1, 2, 3)]
            for h in handles:
                h.wait("committed", timeout=60)
            assert not ckpt.preempted
            served.md.aws_notice = True
            assert called.wait(30), "on_preempt did not run"
            assert ckpt.preempted
            s3_proxy.up()
            handles[2].wait("uploaded", timeout=120)
            reply = ckpt._conn.request({"op": "drain", "timeout": 120}, timeout=180)  # type: ignore[union-attr]
            status = ckpt.status()
        assert reply["ok"], reply
        assert status["preempted"]
        states = {j["tag"]: j["state"] for j in status["jobs"] if j["run"] == "spot"}
        assert states["step-00000003"] == "uploaded"
        # With one upload worker at most one older upload was in flight at the notice; every
        # waiting one was dropped instead of being uploaded.
        dropped = [s for s in (1, 2) if states[f"step-{s:08d}"] == "dropped"]
        assert dropped, states
        assert all(states[f"step-{s:08d}"] in ("dropped", "uploaded") for s in (1, 2)), states
        remote = [m["step"] for m in ckptd.list_checkpoints(f"s3://{s3_bucket}/pre/spot")]
        assert 3 in remote and not set(dropped) & set(remote), (remote, dropped)
        assert "preemption notice from aws" in d.log_text()
        for s in dropped:  # a dropped upload's checkpoint is still on local disk
            assert ckptd.load(f"{d.root}/spot", tag=f"step-{s:08d}")["meta"]["step"] == s
        # Superseded uploads were dropped on purpose; their local copies are kept: not lost.
        fault_log("spot notice (AWS IMDSv2) with an upload backlog", 1, 3, 0)
    finally:
        served.close()
