"""The request budget on one machine: 32 DCP ranks over 4 daemons save one checkpoint to the
moto S3 server through a fault proxy that answers 503 SlowDown to a fraction of the requests.

The proxy counts every request by S3 operation. The checkpoint must end committed, every
injected 503 must have been retried (and counted in the daemons' ``store_retries``), and the
requests the server saw must be exactly the plan of docs/scale.md, computed from the manifest's
file sizes with the same part-size rule: per shard one existence check of the manifest and one
PutObject (or Create + parts + Complete + Head), then for the commit one listing and the DCP
metadata, the manifest and ``latest``.

The 32 ranks are threads of one process (``tests/scale_worker.py``, PyTorch's threaded process
group): 32 interpreters with torch would not fit 2 cores in a minute; the daemons, the protocol,
the store and the commit are the real ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest

import ckptd
from ckptd.storage.parts import part_count, s3_part_size
from ckptd.storage.s3 import DEFAULT_PART_SIZE
from tests.faultproxy import FaultProxy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20
WORLD, DAEMONS = 32, 4
SMALL = 64 << 10  # each rank's own tensor
BIG = 20 * MiB  # one replicated tensor: one shard goes multipart (3 parts of 8 MiB)
FAIL_RATE = 0.15
RUN, TAG = "simrun", "step-1"


def plan(files: dict[str, dict[str, Any]], threshold: int = DEFAULT_PART_SIZE) -> Counter[str]:
    """The requests one sharded checkpoint costs on S3, by operation (docs/scale.md)."""
    out: Counter[str] = Counter()
    for name, rec in files.items():
        if not name.startswith("shard-"):
            continue  # the commit writes the rest
        size = int(rec["size"])
        out["GetObject"] += 1  # upload_part: is the tag committed already?
        out["ListObjectsV2"] += 1  # upload_part: does shared/ hold this shard's blob already?
        if size <= threshold:
            out["PutObject"] += 1
        else:
            n = part_count(size, s3_part_size(size, DEFAULT_PART_SIZE))
            out.update({"CreateMultipartUpload": 1, "UploadPart": n,
                        "CompleteMultipartUpload": 1, "HeadObject": 1})  # fmt: skip
    # the coordinating rank, before any rank writes: is the tag committed already? (DCP's own
    # "Checkpoint already exists" refusal, in ckptd.dcp.Writer's global plan)
    out["GetObject"] += 1
    # the global commit: one listing (1,000 keys a page), then metadata, manifest, latest
    out["ListObjectsV2"] += -(-len(files) // 1000)
    out["ListObjectsV2"] += 1  # ... and one listing of shared/, where the shards are
    out["PutObject"] += (len(files) - sum(n.startswith("shard-") for n in files)) + 2
    return out


def store_retries(socket: str) -> int:
    st = subprocess.run(
        [sys.executable, "-m", "ckptd", "status", "--socket", socket, "--json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return sum(json.loads(st.stdout)["store_retries"].values())


@pytest.mark.slow
def test_32_ranks_over_4_daemons_commit_through_slowdowns_within_the_plan(
    s3_proxy: FaultProxy, s3_bucket: str, make_daemon, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    store = f"s3://{s3_bucket}/sim"
    daemons = [make_daemon(store=store, name=f"n{i}") for i in range(DAEMONS)]
    # 503 SlowDown on 15% of this run's requests (the stores' start-up probes are spared:
    # they are not the checkpoint's requests, and they run once per daemon, not per save).
    s3_proxy.fail_rate(FAIL_RATE, 503, match=RUN, seed=18)
    out = tmp_path / "sim.json"
    args = {"world": WORLD, "sockets": [d.socket for d in daemons], "run": RUN, "tag": TAG,
            "store": store, "small": SMALL, "big": BIG, "out": str(out)}  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    with open(tmp_path / "sim.log", "w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.scale_worker", json.dumps(args)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=240,
        )  # fmt: skip
    result = json.loads(out.read_text()) if out.exists() else None
    assert proc.returncode == 0 and result is not None, (tmp_path / "sim.log").read_text()[-3000:]
    assert not result["errors"], next(iter(result["errors"].values()))
    s3_proxy.clear()
    prefix = f"/{s3_bucket}/sim/{RUN}/"
    seen, injected = s3_proxy.count(prefix), s3_proxy.count(prefix, injected=True)
    probes = sum(1 for c in s3_proxy.calls if "/.ckptd/probe" in c.path)
    retries = sum(store_retries(d.socket) for d in daemons)

    url = f"{store}/{RUN}"
    [manifest] = ckptd.list_checkpoints(url)
    assert manifest["tag"] == TAG and manifest["world_size"] == WORLD
    ckptd.verify(url, TAG)
    files = manifest["files"]
    assert sum(n.startswith("shard-") for n in files) == WORLD  # every rank wrote its own shard
    want = plan(files)
    print(f"\nscale sim: {WORLD} ranks / {DAEMONS} daemons in {result['seconds']:.1f} s; "
          f"server saw {sum(seen.values())} requests {dict(sorted(seen.items()))}; "
          f"plan {sum(want.values())}; injected {sum(injected.values())} x 503 "
          f"{dict(sorted(injected.items()))}; retries {retries}; store probes {probes}")  # fmt: skip
    assert want["UploadPart"] == 3  # the big shard went multipart, in the rule's parts
    assert seen == want  # exactly the plan: no request repeated past a 503, none extra
    assert sum(injected.values()) >= 5  # the faults did happen ...
    # ... and each was one retry, counted by the daemon that made it (the coordinating rank's
    # own existence check is retried in the training process, which no daemon counts)
    assert sum(injected.values()) - 1 <= retries <= sum(injected.values())
    for d in daemons:
        assert d.stop() == 0
