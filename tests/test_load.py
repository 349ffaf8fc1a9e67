"""Load: several training processes saving concurrently through one daemon with S3 upload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import ckptd

SECONDS = float(os.environ.get("CKPTD_LOAD_SECONDS", "60"))

TRAINER = textwrap.dedent(
    """
    import json, sys, time, torch
    from ckptd import Checkpointer
    run, sock, seconds, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    torch.manual_seed(hash(run) % 1000)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.Linear(256, 128))
    opt = torch.optim.Adam(model.parameters())
    ckpt = Checkpointer(run, socket=sock)
    saved, step, end = [], 0, time.monotonic() + seconds
    while time.monotonic() < end:
        step += 1
        model(torch.randn(8, 128)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        h = ckpt.save(step, model=model, optimizer=opt)
        saved.append([step, float(model[0].weight.detach().double().sum())])
        time.sleep(0.3)
    ckpt.close()
    json.dump(saved, open(out, "w"))
    """
)


@pytest.mark.slow
def test_four_trainers_for_a_minute_lose_nothing(
    s3_bucket, make_daemon, tmp_path, fault_log
) -> None:  # type: ignore[no-untyped-def]
    store = f"s3://{s3_bucket}/load"
    d = make_daemon(store=store)
    procs = []
    for i in range(4):
        out = tmp_path / f"saved-{i}.json"
        procs.append((f"load-{i}", out, subprocess.Popen(
            [sys.executable, "-c", TRAINER, f"load-{i}", d.socket, str(SECONDS), str(out)]
        )))  # fmt: skip
    for _, _, p in procs:
        assert p.wait(SECONDS + 240) == 0
    with ckptd.Checkpointer("observer", socket=d.socket) as obs:
        reply = obs._conn.request({"op": "drain", "timeout": 300}, timeout=400)  # type: ignore[union-attr]
        status = obs.status()
    assert reply["ok"], reply["pending"][:3]
    with open(f"/proc/{d.proc.pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    peak_mb = int(fields["VmHWM"].split()[0]) / 1024
    counts = {}
    for run, out, _ in procs:
        saved = json.loads(out.read_text())
        remote = ckptd.list_checkpoints(f"{store}/{run}")
        assert [m["step"] for m in remote] == [s for s, _ in saved], run  # nothing lost
        last = ckptd.load(f"{store}/{run}")
        assert float(last["model"]["0.weight"].double().sum()) == saved[-1][1]
        counts[run] = len(saved)
    print(f"saves per run {counts}; daemon peak RSS {peak_mb:.0f} MB; "
          f"uploaded {status['bytes_uploaded'] / 2**20:.0f} MiB")  # fmt: skip
    fault_log(
        f"load: 4 trainers saving for {SECONDS:.0f} s, one daemon, S3", 0, sum(counts.values()), 0
    )
    assert peak_mb < 400, peak_mb  # bounded: no torch in the daemon, no buffering of whole files
    assert min(counts.values()) >= 0.5 * max(counts.values())  # the daemon kept up with everyone
