"""The restore section of ``python -m bench`` (issue 16): ckptd's reads against the usual peers.

One state is saved once through a real daemon to three runs: ``local`` (the daemon's root only),
``s3`` (moto_server) and ``gcs`` (fake-gcs-server), plus ``dcp`` (``ckptd.dcp.Writer`` to S3).
The peers get the same state their usual way: a ``torch.save`` file on local disk and in each
bucket, and a ``dcp.save`` / ``FileSystemWriter`` folder uploaded with boto3. Then, per repeat and
interleaved, every contender restores it (medians over repeats; one untimed round first, which
also checks every restore bit for bit). Peak RSS is measured in a fresh child per case
(``bench.restore_rss``).

Caching, honestly: every read here is warm. The local files were just written and the machine
has the RAM to keep them; both servers serve from memory or from their own temp files. ckptd and
each peer read the same bytes from the same place, so the ratios compare like with like, but
none of them is a cold-disk or real-network figure.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

import ckptd
import ckptd.dcp
from ckptd.compare import bitwise_equal
from ckptd.testing.servers import S3_ENV, bucket_name, create_gcs_bucket

from . import restore_peers as P
from .infra import Infra, settle
from .report import Case, Results
from .restore_rss import measure
from .states import State, build, free

LOCAL = "restore, local root (warm page cache)"
S3 = "restore from S3 (moto_server, loopback)"
GCS = "restore from GCS (fake-gcs-server, loopback)"
DCP = "dcp.load from S3 (moto_server)"
RSS = "peak RSS of a fresh restoring process / state size"

TORCH_LOAD = "torch.load (torch.save file)"
CK_LOAD = "ckptd.load"
PEER_RESTORE = "load_state_dict(torch.load) model + optim"
CK_RESTORE = "Checkpointer.restore(model, opt)"
RAW = "limit: {plan} ({client})"  # one row per plan of restore_peers.PLANS
BOTO3 = "boto3 download_file + torch.load"
GCLOUD = "gcloud-aio download_to_filename+torch.load"
CK_DCP = "dcp.load via ckptd.dcp.Reader"
FS_DCP = "boto3 download + dcp.load FileSystemReader"


def raw_s3(plan: str) -> str:
    return RAW.format(plan=plan, client="aiobotocore")


def raw_gcs(plan: str) -> str:
    return RAW.format(plan=plan, client="aiohttp")


PREFIX = "ckptd"  # store prefix of ckptd's runs in each bucket
DCP_TAG = "step-1"

now = time.perf_counter


def log(msg: str) -> None:
    import sys

    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Sources:
    """Where the one state lies, each contender's way, and how to reach it."""

    socket: str
    root: str
    s3_bucket: str
    gcs_bucket: str
    s3: P.S3Peer
    gcs: P.GcsPeer
    torch_path: str
    work: str
    torch_bytes: int = 0
    nbytes: dict[str, int] = field(default_factory=dict)  # run -> checkpoint bytes
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)  # run -> key -> bytes

    def url(self, run: str) -> str:
        if run == "local":
            return os.path.join(self.root, "local")
        bucket = self.s3_bucket if run in ("s3", "dcp") else self.gcs_bucket
        return f"{'gs' if run == 'gcs' else 's3'}://{bucket}/{PREFIX}/{run}"


def _manifest_sizes(root: str, run: str, tag: str) -> dict[str, int]:
    import json

    d = os.path.join(root, run, "checkpoints", tag)
    with open(os.path.join(d, "MANIFEST.json")) as f:
        files = json.load(f)["files"]
    return {f"{PREFIX}/{run}/checkpoints/{tag}/{n}": int(r["size"]) for n, r in files.items()}


def _wait_for(pred: Callable[[], bool], what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not there after {timeout:.0f} s")
        time.sleep(delay)  # polling a store, not synchronization between our own threads
        delay = min(delay * 2, 1.0)


def servers(infra: Infra) -> str:
    """Start moto_server and fake-gcs-server (once per bench) and point this process's
    environment at them, before any daemon is started (it inherits it); fake-gcs's URL."""
    moto, gcs = infra.moto(), infra.fake_gcs()
    os.environ.update(S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = moto.url
    os.environ["STORAGE_EMULATOR_HOST"] = gcs.url
    return gcs.url


def prepare(infra: Infra, state: State, socket: str, root: str) -> Sources:
    """Save ``state`` every contender's way (untimed)."""
    gcs = infra.fake_gcs()
    s3b, gcsb = bucket_name(), bucket_name()
    s3 = P.S3Peer(s3b)
    s3.client.create_bucket(Bucket=s3b)
    create_gcs_bucket(gcs.url, gcsb)
    work = infra.path(f"restore-{state.name}", "")
    src = Sources(socket, root, s3b, gcsb, s3, P.GcsPeer(gcs.url, gcsb), "", work)
    for run in ("local", "s3", "gcs"):
        store = None if run == "local" else src.url(run).rsplit("/", 1)[0]
        ck = ckptd.Checkpointer(run, socket=socket, store=store)
        try:
            h = ck.save(1, model=state.model, optimizer=state.optimizer)
            h.wait("uploaded", timeout=1800)
        finally:
            ck.close()
        sizes = _manifest_sizes(root, run, h.tag)
        src.sizes[run], src.nbytes[run] = sizes, sum(sizes.values())
    import torch.distributed.checkpoint as dcp

    writer = ckptd.dcp.Writer(run="dcp", store=src.url("dcp").rsplit("/", 1)[0], socket=socket)
    try:
        dcp.save(state.snapshot(), checkpoint_id=DCP_TAG, storage_writer=writer, no_dist=True)
    finally:
        writer.close()
    manifest = f"{PREFIX}/dcp/checkpoints/{DCP_TAG}/MANIFEST.json"
    _wait_for(lambda: s3.exists(manifest), f"s3://{s3b}/{manifest}")
    src.torch_path = os.path.join(work, "state.pt")
    torch.save(state.snapshot(), src.torch_path)
    src.torch_bytes = os.path.getsize(src.torch_path)
    s3.upload(src.torch_path, "peer/state.pt")
    src.gcs.upload(src.torch_path, "peer/state.pt")
    fs_dir = os.path.join(work, "fs-dcp")
    dcp.save(state.snapshot(), storage_writer=dcp.FileSystemWriter(fs_dir), no_dist=True)
    s3.upload_dir(fs_dir, "peer-dcp")
    P.rmtree(fs_dir)
    return src


# ---- the contenders: each returns what it restored (for the bitwise check) ----------------


def _state_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    from .runners import _canon, _tensors_equal

    return bitwise_equal(a["model"], b["model"]) and (
        bitwise_equal(_canon(a["optimizer"]), _canon(b["optimizer"]))
        or _tensors_equal(a["optimizer"], b["optimizer"])
    )


class Round:
    """One restore by every contender; ``times`` gathers seconds per contender."""

    def __init__(self, src: Sources, state: State, target: State) -> None:
        self.src, self.state, self.target = src, state, target
        self.times: dict[str, list[float]] = {}
        self.equal: dict[str, bool] = {}
        self.ck = ckptd.Checkpointer("local", socket=src.socket)

    def _timed(self, name: str, fn: Callable[[], Any], mode: str) -> None:
        """``mode``: "time" (keep the seconds), "verify" (check the result), "warm" (neither)."""
        settle()
        t0 = now()
        out = fn()
        took = now() - t0
        if mode == "verify":
            got = out if isinstance(out, dict) else self.target.snapshot()
            self.equal[name] = _state_equal(got, self.state.snapshot())
            self._scramble()
        elif mode == "time":
            self.times.setdefault(name, []).append(took)
        del out

    def _scramble(self) -> None:
        """After a restore into the target, change it again, so the next restore must work."""
        with torch.no_grad():
            for t in self.target.tensors():
                if t.is_floating_point() and t.numel():
                    t.view(-1)[:1].add_(1.0)

    def run(self, verify: bool) -> None:
        src, tgt = self.src, self.target
        tmp = os.path.join(src.work, "peer-download.pt")

        def peer_restore() -> None:
            sd = torch.load(src.torch_path, map_location="cpu")
            tgt.model.load_state_dict(sd["model"])
            tgt.optimizer.load_state_dict(sd["optimizer"])

        def ck_restore() -> None:
            if self.ck.restore(tgt.model, tgt.optimizer) is None:
                raise RuntimeError("Checkpointer.restore found no checkpoint")

        def dcp_reader() -> None:
            import torch.distributed.checkpoint as dcp

            reader = ckptd.dcp.Reader(url=src.url("dcp"))
            dcp.load(tgt.snapshot(), checkpoint_id=DCP_TAG, storage_reader=reader, no_dist=True)

        def dcp_fs() -> None:
            import torch.distributed.checkpoint as dcp

            d = os.path.join(src.work, "fs-dcp-download")
            try:
                src.s3.download_dir("peer-dcp", d)
                reader = dcp.FileSystemReader(d)
                dcp.load(tgt.snapshot(), storage_reader=reader, no_dist=True)
            finally:
                P.rmtree(d)

        steps: list[tuple[str, Callable[[], Any]]] = [
            (f"{LOCAL}|{TORCH_LOAD}", lambda: torch.load(src.torch_path, map_location="cpu")),
            (f"{LOCAL}|{CK_LOAD}", lambda: ckptd.load(src.url("local"))),
            (f"{LOCAL}|{PEER_RESTORE}", peer_restore),
            (f"{LOCAL}|{CK_RESTORE}", ck_restore),
            *[
                (
                    f"{S3}|{raw_s3(plan)}",
                    partial(P.s3_ranged_get, src.s3_bucket, src.sizes["s3"], plan),
                )
                for plan in P.PLANS
            ],
            (f"{S3}|{CK_LOAD}", lambda: ckptd.load(src.url("s3"))),
            (f"{S3}|{BOTO3}", lambda: src.s3.download_load("peer/state.pt", tmp)),
            *[
                (
                    f"{GCS}|{raw_gcs(plan)}",
                    partial(P.gcs_ranged_get, src.gcs.host, src.gcs_bucket, src.sizes["gcs"], plan),
                )
                for plan in P.PLANS
            ],
            (f"{GCS}|{CK_LOAD}", lambda: ckptd.load(src.url("gcs"))),
            (f"{GCS}|{GCLOUD}", lambda: src.gcs.download_load("peer/state.pt", tmp)),
            (f"{DCP}|{CK_DCP}", dcp_reader),
            (f"{DCP}|{FS_DCP}", dcp_fs),
        ]
        for name, fn in steps:
            if not verify:
                self._timed(name, fn, "time")
            else:  # a limit returns bytes, nothing to check: the round only warms it
                self._timed(
                    name, fn, "warm" if name.split("|")[1].startswith("limit") else "verify"
                )

    def close(self) -> None:
        self.ck.close()


def _rss_cases(src: Sources, state: State) -> list[tuple[str, dict[str, Any]]]:
    spec = list(state.spec)
    return [
        ("ckptd.load, local root", {"kind": "ckptd.load", "url": src.url("local"), "tag": "latest"}),
        ("ckptd.load, S3", {"kind": "ckptd.load", "url": src.url("s3"), "tag": "latest"}),
        ("ckptd.load, GCS", {"kind": "ckptd.load", "url": src.url("gcs"), "tag": "latest"}),
        (
            "Checkpointer.restore, local (incl. model)",
            {"kind": "Checkpointer.restore", "run": "local", "socket": src.socket,
             "tag": "latest", "state": spec},
        ),
        ("torch.load (reference)", {"kind": "torch.load", "path": src.torch_path}),
        (
            "load_state_dict(torch.load), incl. model",
            {"kind": "load_state_dict(torch.load)", "path": src.torch_path, "state": spec},
        ),
    ]  # fmt: skip


def run_restore(infra: Infra, state: State, repeats: int, res: Results) -> str:
    """The whole restore section for ``state``; adds its rows and goals to ``res``; the case."""
    case = f"{state.name} restore"
    res.cases.append(Case(case, state.shape, state.nbytes, state.ntensors, "cpu"))
    servers(infra)
    daemon = infra.daemon(f"restore-{state.name}")
    rss: list[tuple[str, dict[str, Any]]] = []
    target: State | None = None
    src: Sources | None = None
    rnd: Round | None = None
    try:
        log(f"{case}: saving the state every contender's way")
        src = prepare(infra, state, daemon.socket, daemon.root)
        target = build(state.spec, "cpu", seed=1)
        rnd = Round(src, state, target)
        log(f"{case}: untimed round, every restore checked bit for bit")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rnd.run(verify=True)
            for i in range(repeats):
                log(f"{case}: timed round {i + 1} of {repeats}")
                rnd.run(verify=False)
        rnd.close()
        for name, spec in _rss_cases(src, state):
            log(f"{case}: peak RSS, {name}")
            rss.append((name, measure(spec)))
        daemon.stop(120)
    finally:
        daemon.kill()
        if rnd is not None:
            rnd.close()
        if target is not None:
            free(target)
        if src is not None:
            src.s3.clear()
            src.gcs.clear()
            P.rmtree(src.work)
    assert src is not None and rnd is not None
    _report(res, case, state, src, rnd, rss)
    return case


def _report(
    res: Results,
    case: str,
    state: State,
    src: Sources,
    rnd: Round,
    rss: list[tuple[str, dict[str, Any]]],
) -> None:
    nb = src.nbytes["s3"]
    for key, times in rnd.times.items():
        section, who = key.split("|")
        eq = rnd.equal.get(key)
        note = "" if eq is None else f"restored bitwise equal: {eq}"
        if section in (S3, GCS) and times:
            mbps = src.nbytes["s3" if section == S3 else "gcs"] / sorted(times)[len(times) // 2]
            note = f"{mbps / 1e6:.0f} MB/s of checkpoint bytes" + (f"; {note}" if note else "")
        res.add(case, section, who, times, "s", note)
    for name, r in rss:
        res.add(
            case,
            RSS,
            name,
            r["rise"] / state.nbytes,
            "x",
            f"peak {r['peak'] / 2**20:.0f} MiB - baseline {r['baseline'] / 2**20:.0f} MiB"
            + ("" if r["reset"] else " (VmHWM not reset: includes the import peak)"),
        )
    res.meta.setdefault("restore", {})[case] = {
        "checkpoint_bytes": nb,
        "torch_save_file_bytes": src.torch_bytes,
        "cache": "warm: local files just written, servers in memory; both sides alike",
        "ranged_get_plans": {k: list(v) for k, v in P.PLANS.items()},
    }
    goals(res, case, [n for n, _ in rss])


def goals(res: Results, case: str, rss_names: list[str]) -> None:
    res.goal(
        "restore: ckptd.load / torch.load (local)",
        case,
        res.ratio(case, (LOCAL, CK_LOAD), (LOCAL, TORCH_LOAD)),
        "<=",
        0.8,
    )
    res.goal(
        "restore: Checkpointer.restore / load_state_dict (local)",
        case,
        res.ratio(case, (LOCAL, CK_RESTORE), (LOCAL, PEER_RESTORE)),
        "<=",
        0.8,
    )
    for section, raw, peer, short in ((S3, raw_s3, BOTO3, "S3"), (GCS, raw_gcs, GCLOUD, "GCS")):
        best = min((res.get(case, section, raw(p)) or float("inf") for p in P.PLANS), default=None)
        ck = res.get(case, section, CK_LOAD)
        res.goal(
            f"restore {short}: ckptd.load throughput / ranged GETs",
            case,
            None if ck is None or best in (None, float("inf")) else best / ck,
            ">=",
            0.8,
            "against the fastest plan",
        )
        res.goal(
            f"restore {short}: ckptd.load / {peer.split(' + ')[0].split()[0]} + torch.load",
            case,
            res.ratio(case, (section, CK_LOAD), (section, peer)),
            "<=",
            0.25,
        )
    res.goal(
        "restore: dcp.load ckptd Reader / download + FileSystemReader",
        case,
        res.ratio(case, (DCP, CK_DCP), (DCP, FS_DCP)),
        "<=",
        0.5,
    )
    for name in rss_names:
        if name.startswith(("ckptd", "Checkpointer")):
            res.goal(f"restore peak RSS / state: {name}", case, res.get(case, RSS, name), "<=", 1.1)


__all__ = ["run_restore"]
