"""Network faults between the daemon and real S3/GCS servers, through a fault-injecting proxy.

Each scenario ends with every committed checkpoint in the store, verified bit for bit, once the
fault clears; or, where it cannot clear (SIGTERM while the store is down), with the loss reported
and the checkpoint kept on disk for the next start.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

import ckptd
from ckptd import Checkpointer
from tests.helpers import bitwise_equal, until


@pytest.fixture(params=["s3", "gs"])
def proxied(request):  # type: ignore[no-untyped-def]
    """(store URL, proxy) with the client libraries pointed at the proxy in front of the server."""
    if request.param == "s3":
        proxy = request.getfixturevalue("s3_proxy")
        return f"s3://{request.getfixturevalue('s3_bucket')}/f", proxy
    proxy = request.getfixturevalue("gcs_proxy")
    return f"gs://{request.getfixturevalue('gcs_bucket')}/f", proxy


def _model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 64))
    opt = torch.optim.Adam(m.parameters())
    m(torch.randn(2, 1024)).sum().backward()
    opt.step()
    return m, opt


def _lost(store: str, run: str, expect: dict[int, dict[str, torch.Tensor]]) -> int:
    """How many of the saved steps are missing from the store or differ from what was saved."""
    have = {m["step"] for m in ckptd.list_checkpoints(f"{store}/{run}")}
    lost = 0
    for step, sd in expect.items():
        if step not in have:
            lost += 1
            continue
        state = ckptd.load(f"{store}/{run}", tag=f"step-{step:08d}")
        lost += not bitwise_equal(state["model"], sd)
    return lost


def _retries(ckpt: Checkpointer, run: str) -> int:
    return sum(j["retries"] for j in ckpt.status()["jobs"] if j["run"] == run)


def test_503s_and_resets(proxied, make_daemon, fault_log) -> None:  # type: ignore[no-untyped-def]
    store, proxy = proxied
    d = make_daemon(store=store)
    m, opt = _model()
    proxy.fail_next(3, status=503)  # whatever comes next: uploads, commits, verifications
    proxy.reset_next(2)
    with Checkpointer("r503", socket=d.socket) as ckpt:
        ckpt.save(1, model=m, optimizer=opt).wait("uploaded", timeout=180)
    injected = proxy.injected["http_503"] + proxy.injected["reset"]
    assert proxy.injected["http_503"] >= 3 and proxy.injected["reset"] >= 2, proxy.injected
    lost = _lost(store, "r503", {1: m.state_dict()})
    fault_log(f"{store[:2]}: 503 responses and connection resets", injected, 1, lost)
    assert lost == 0


def test_reset_mid_body_and_stall(proxied, make_daemon, fault_log) -> None:  # type: ignore[no-untyped-def]
    store, proxy = proxied
    d = make_daemon(store=store)
    m, opt = _model(1)
    proxy.reset_after(3 << 20)  # cut a request in the middle of its body
    proxy.stall(2.0)
    with Checkpointer("rmid", socket=d.socket) as ckpt:
        ckpt.save(1, model=m, optimizer=opt).wait("uploaded", timeout=180)
    injected = proxy.injected["reset"] + proxy.injected["stall"]
    assert proxy.injected["reset"] >= 1, proxy.injected
    lost = _lost(store, "rmid", {1: m.state_dict()})
    fault_log(f"{store[:2]}: reset mid-body, stalled response", injected, 1, lost)
    assert lost == 0


def test_slow_bandwidth(proxied, make_daemon, fault_log) -> None:  # type: ignore[no-untyped-def]
    store, proxy = proxied
    d = make_daemon(store=store)
    proxy.limit_bandwidth(4 << 20)  # 4 MiB/s: the upload takes seconds, the loop does not care
    saved = {}
    with Checkpointer("slow", socket=d.socket) as ckpt:
        handles = []
        for step in (1, 2):
            m, opt = _model(step)
            t = time.perf_counter()
            handles.append(ckpt.save(step, model=m, optimizer=opt))
            assert time.perf_counter() - t < 2.0  # save() never waits for the network
            saved[step] = m.state_dict()
        for h in handles:
            h.wait("uploaded", timeout=240)
    lost = _lost(store, "slow", saved)
    fault_log(f"{store[:2]}: bandwidth limited to 4 MiB/s", 1, 2, lost)
    assert lost == 0


def test_store_unreachable_then_back(proxied, make_daemon, fault_log) -> None:  # type: ignore[no-untyped-def]
    store, proxy = proxied
    d = make_daemon(store=store)
    proxy.down()
    saved = {}
    with Checkpointer("outage", socket=d.socket) as ckpt:
        for step in (1, 2, 3):
            m, _ = _model(step)
            ckpt.save(step, model=m).wait("committed", timeout=60)
            saved[step] = m.state_dict()
        until(lambda: _retries(ckpt, "outage") > 0, 120, "failed upload attempts")
        refused = proxy.injected["refused"]
        proxy.up()
        reply = ckpt._conn.request({"op": "drain", "timeout": 240}, timeout=300)  # type: ignore[union-attr]
    assert reply["ok"], reply
    lost = _lost(store, "outage", saved)
    fault_log(f"{store[:2]}: store unreachable (connections refused)", refused, 3, lost)
    assert lost == 0


def test_daemon_killed_while_store_down_resumes(proxied, make_daemon, fault_log) -> None:  # type: ignore[no-untyped-def]
    store, proxy = proxied
    d = make_daemon(store=store)
    proxy.down()
    m, opt = _model(7)
    with Checkpointer("resume", socket=d.socket) as ckpt:
        ckpt.save(7, model=m, optimizer=opt).wait("committed", timeout=60)
    d.kill()  # SIGKILL: nothing drains
    proxy.up()
    d.start()
    with Checkpointer("watch", socket=d.socket) as ckpt:
        reply = ckpt._conn.request({"op": "drain", "timeout": 120}, timeout=180)  # type: ignore[union-attr]
    assert reply["ok"], reply
    assert "1 upload(s) to resume" in d.log_text()
    lost = _lost(store, "resume", {7: m.state_dict()})
    fault_log(f"{store[:2]}: daemon SIGKILLed with an upload owed", 1, 1, lost)
    assert lost == 0


def test_sigterm_while_store_down_reports_and_keeps(proxied, make_daemon, fault_log) -> None:  # type: ignore[no-untyped-def]
    store, proxy = proxied
    d = make_daemon(store=store, args=["--drain-timeout", "3"])
    proxy.down()
    m, _ = _model(3)
    with Checkpointer("stuck", socket=d.socket) as ckpt:
        ckpt.save(1, model=m).wait("committed", timeout=60)
    t = time.monotonic()
    d.proc.proc.send_signal(signal.SIGTERM)
    code = d.proc.proc.wait(60)
    assert code == 1 and time.monotonic() - t < 30  # bounded, and says it is not done
    assert "left behind: stuck@step-00000001" in d.log_text()
    # Not lost: on the next start with the network back, it is uploaded.
    proxy.up()
    d.start()
    with Checkpointer("watch", socket=d.socket) as ckpt:
        assert ckpt._conn.request({"op": "drain", "timeout": 120}, timeout=180)["ok"]  # type: ignore[union-attr]
    lost = _lost(store, "stuck", {1: m.state_dict()})
    fault_log(f"{store[:2]}: SIGTERM while the store is down, then restart", 1, 1, lost)
    assert lost == 0


def test_daemon_killed_mid_upload_resumes_from_its_journal(
    s3_proxy, s3_bucket, make_daemon, fault_log
) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL in the middle of a multipart upload: the restart continues it; finished parts stay."""
    import json

    from ckptd.atomic import is_temp

    store = f"s3://{s3_bucket}/mid"
    d = make_daemon(store=store, args=["--file-concurrency", "1"])
    torch.manual_seed(5)
    big = {"w": torch.randn(20 << 20 >> 2), "v": torch.randn(20 << 20 >> 2)}  # 40 MiB: 5 parts
    s3_proxy.limit_bandwidth(6 << 20)  # slow enough to be caught half way
    jdir = os.path.join(d.root, ".ckptd", "journal", "mid", "step-00000001")

    def finished_parts() -> set[str]:
        parts: set[str] = set()
        for name in os.listdir(jdir) if os.path.isdir(jdir) else []:
            if is_temp(name):  # a journal write the kill cut short: not what the daemon reads
                continue
            try:
                with open(os.path.join(jdir, name)) as f:
                    parts |= set(json.load(f).get("parts", {}))
            except (OSError, ValueError):
                continue  # being replaced right now
        return parts

    with Checkpointer("mid", socket=d.socket) as ckpt:
        ckpt.save(1, model=big).wait("committed", timeout=60)
        until(lambda: len(finished_parts()) >= 1, 120, "a first part to finish")
    d.kill()
    done_before = finished_parts()
    n_before = len(s3_proxy.requests)
    s3_proxy.limit_bandwidth(None)
    d.start()
    with Checkpointer("watch", socket=d.socket) as ckpt:
        assert ckpt._conn.request({"op": "drain", "timeout": 120}, timeout=180)["ok"]  # type: ignore[union-attr]
    after = s3_proxy.requests[n_before:]
    resent = {
        r.split("partNumber=")[1].split("&")[0].split()[0]
        for r in after
        if "partNumber=" in r and "/.ckptd/" not in r  # not the capability probe's own part
    }
    lost = _lost(store, "mid", {1: big})
    fault_log("s3: daemon SIGKILLed in the middle of a multipart upload", 1, 1, lost)
    assert lost == 0
    assert any(r.startswith("GET") and "uploadId=" in r for r in after)  # list_parts on resume
    assert not resent & done_before, f"finished parts sent again: {sorted(resent & done_before)}"
