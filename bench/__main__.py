"""``python -m bench``: ckptd against torch.save, DCP and the hardware's limits, in one run.

Starts what it needs (a ckptd daemon per state, moto_server and fake-gcs-server on loopback),
prints a table (or JSON with ``--json``), and removes every process, file and memory it made.
See bench/RESULTS.md for recorded runs and what each figure means.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings
from typing import Any

import torch

from ckptd.testing.servers import S3_ENV, bucket_name, create_gcs_bucket

from . import runners as R
from .dedup import run_dedup
from .infra import Infra
from .report import (
    CKPTD,
    CKPTD_COMMIT,
    DCP_DEFAULT,
    DCP_STAGER,
    LIMIT,
    RAW,
    Case,
    Results,
    load_average,
    machine_meta,
)
from .restore import run_restore
from .states import State, free, gpt_state, small_state

BLOCK = "blocking per save"
DURABLE = "time to durable"
LOOP = "extra loop time per save"
MEM = "memory (peak during the contender's saves)"
UP_S3 = "upload throughput, S3 (moto_server)"
UP_GCS = "upload throughput, GCS (fake-gcs-server)"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="0.1,0.5,1.5", help="state sizes in GB (default %(default)s)")
    p.add_argument(
        "--dtypes", default="fp32", help="fp32 and/or bf16 (comma separated; %(default)s)"
    )
    p.add_argument("--repeats", type=int, default=3, help="repeats per figure (median)")
    p.add_argument(
        "--small",
        default="1000,3000,10000,30000",
        help="tensor counts of the many-small-tensors model (10000 gets every contender)",
    )
    p.add_argument("--loop-saves", type=int, default=2, help="saves per loop run")
    p.add_argument("--no-loop", action="store_true", help="skip the loop-overhead section")
    p.add_argument(
        "--loop-sizes",
        default=None,
        help="sizes (GB) to run the loop section for; default: those <= 0.5 ('none' to skip)",
    )
    p.add_argument(
        "--upload-sizes",
        default=None,
        help="sizes (GB) to run the upload section for; default: the smallest ('none' to skip)",
    )
    p.add_argument(
        "--restore",
        action="store_true",
        help="run only the restore section (issue 16); the full run includes it",
    )
    p.add_argument("--no-restore", action="store_true", help="skip the restore section")
    p.add_argument(
        "--restore-sizes",
        default=None,
        help="state sizes (GB) of the restore section (default 0.5,1.5; --quick: 0.05)",
    )
    p.add_argument(
        "--dedup",
        action="store_true",
        help="run only the incremental-checkpoint section (issue 15); the full run includes it",
    )
    p.add_argument(
        "--no-dedup", action="store_true", help="skip the incremental-checkpoint section"
    )
    p.add_argument(
        "--dedup-size",
        type=float,
        default=None,
        help="frozen base (GB) of the incremental-checkpoint section (default 0.5; --quick: 0.05)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke check: 0.1 GB (restore 0.05 GB), 1 repeat, ~2 min",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dir", default=None, help="work directory parent (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--json-out", default=None, help="also write the JSON to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.small, args.loop_saves = "0.1", 1, "10000", 2
        args.dtypes = "fp32"
        args.restore_sizes = args.restore_sizes or "0.05"
    if args.restore and args.no_restore:
        p.error("--restore and --no-restore exclude each other")
    if args.dedup and args.no_dedup:
        p.error("--dedup and --no-dedup exclude each other")
    args.restore_list = _size_subset(args.restore_sizes or "0.5,1.5", [])
    if args.no_restore or (args.dedup and not args.restore):
        args.restore_list = []
    if args.dedup_size is None:
        args.dedup_size = 0.05 if args.quick else 0.5
    if args.dedup_size <= 0:
        p.error("--dedup-size must be positive")
    args.dedup_list = (
        [] if args.no_dedup or (args.restore and not args.dedup) else [args.dedup_size]
    )
    if args.restore or args.dedup:
        args.sizes, args.small = "", "none"
    args.size_list = [float(s) for s in args.sizes.split(",") if s]
    args.dtype_list = [d for d in args.dtypes.split(",") if d]
    for d in args.dtype_list:
        if d not in ("fp32", "bf16"):
            p.error(f"unknown dtype {d!r}: use fp32 and/or bf16")
    args.small_list = [int(s) for s in args.small.split(",") if s and s != "none"]
    args.upload_list = _size_subset(args.upload_sizes, args.size_list[:1])
    args.loop_list = _size_subset(args.loop_sizes, [s for s in args.size_list if s <= 0.5])
    if args.no_loop:
        args.loop_list = []
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False here")
    return args


def _size_subset(value: str | None, default: list[float]) -> list[float]:
    if value is None:
        return default
    if value == "none":
        return []
    return [float(s) for s in value.split(",") if s]


class Bench:
    def __init__(self, args: argparse.Namespace, infra: Infra, res: Results) -> None:
        self.args, self.infra, self.res = args, infra, res
        self.device = torch.device(args.device)
        self.tag = f" [{torch.cuda.get_device_name(self.device)}]" if args.device == "cuda" else ""

    # ---- one state ---------------------------------------------------------------------------

    def run_case(self, state: State, full: bool, loop: bool, upload: bool) -> None:
        a, res, name = self.args, self.res, state.name
        dev = f"{self.device}{self.tag}"
        res.cases.append(Case(name, state.shape, state.nbytes, state.ntensors, dev))
        ctx = R.Ctx(self.infra, state, a.repeats)
        mem = self.infra.mem
        log(f"{name}: {state.nbytes / 1e9:.3f} GB, {state.ntensors} tensors: limit")
        lim, buf = R.run_limit(ctx)

        daemon = self.infra.daemon(f"local-{name}")
        mem.daemon_pid = daemon.pid
        cr = R.start_ckptd(ctx, daemon.socket, daemon.root, "bench")
        m_th: dict[str, int] = {}
        try:
            log(
                f"{name}: ckptd, each save after the limit copy"
                + (" and a raw write" if full else "")
            )
            try:
                with mem.phase() as m_ck:
                    ck = R.run_ckptd(ctx, cr, buf, raw=full)
            finally:
                buf.close()
            res.add(name, BLOCK, LIMIT, ck["limit"], "s", _pinned(lim))
            # outside the memory phase: loading the checkpoint back allocates a state's worth
            ck["verified"] = R.verify_ckptd(state, os.path.join(cr.root, cr.run), cr.last_tag)
            res.add(
                name,
                BLOCK,
                CKPTD + self.tag,
                ck["blocking"],
                "s",
                f"first save {ck['first'] * 1e3:.0f} ms (allocates the arena); "
                f"restored bitwise equal: {ck['verified']}",
            )
            if full:
                note = "interleaved with ckptd's saves, same bytes, same filesystem"
                res.add(name, DURABLE, RAW, ck["raw"], "s", note)
                res.add(name, DURABLE, CKPTD_COMMIT, ck["durable"], "s")
            if not ck["verified"]:
                log(f"{name}: the restored checkpoint is NOT bitwise equal to the state")
            log(f"{name}: torch.save")
            with mem.phase() as m_ts:
                ts = R.run_torch_save(ctx)
            res.add(name, BLOCK, "torch.save", ts["blocking"], "s", "to local disk, no fsync")
            if full:
                log(f"{name}: torch.save in a thread")
                with mem.phase() as m_th:
                    th = R.run_torch_save_thread(ctx)
                res.add(
                    name,
                    BLOCK,
                    "torch.save in a thread after a clone",
                    th["blocking"],
                    "s",
                    "clone time",
                )
            log(f"{name}: dcp.async_save")
            with mem.phase() as m_dcp:
                dcp = R.run_dcp(ctx, "default")
            res.add(name, BLOCK, DCP_DEFAULT, dcp["blocking"], "s", "no_dist, default staging")
            m_st: dict[str, int] = {}
            if full and R.has_dcp_stager():
                log(f"{name}: dcp.async_save with DefaultStager")
                with mem.phase() as m_st:
                    st = R.run_dcp(ctx, "stager")
                note = (
                    "pinned + shared memory, async staging; blocking = until async_save returns"
                    if self.device.type == "cuda"
                    else "shared memory, reused buffers; blocking includes staging"
                )
                res.add(name, BLOCK, DCP_STAGER + self.tag, st["blocking"], "s", note)
            if full:
                self._memory(name, m_ck, m_ts, m_dcp, m_st, m_th)
            if loop:
                log(f"{name}: loop overhead")
                copy_s = res.get(name, BLOCK, LIMIT) or 0.01
                write_s = res.get(name, DURABLE, CKPTD_COMMIT) or copy_s
                lp = R.run_loop(ctx, cr, copy_s, write_s, a.loop_saves)
                note = (
                    f"{lp['steps']} steps of {lp['step_s'] * 1e3:.0f} ms ({lp['matmuls_per_step']} "
                    f"matmuls), a save every {lp['every']}; extra = (with - without) / {lp['saves']}"
                )
                res.add(name, LOOP, "loop without saves (total)", lp["base"], "s", note)
                res.add(
                    name,
                    LOOP,
                    "ckptd" + self.tag,
                    lp["extra"]["ckptd"],
                    "s",
                    f"skipped saves: {lp['skipped']}",
                )
                res.add(name, LOOP, "torch.save", lp["extra"]["torch.save"], "s")
                dcp_name = DCP_STAGER if self.device.type == "cuda" else DCP_DEFAULT
                res.add(name, LOOP, dcp_name, lp["extra"]["dcp"], "s")
            cr.ckpt.close()
            code = daemon.stop(120)
            if code != 0:
                log(f"{name}: local daemon exited with {code}")
        finally:
            mem.daemon_pid = None
            daemon.kill()
        if upload:
            self._uploads(ctx)

    def _memory(self, name: str, ck: dict, ts: dict, dcp: dict, st: dict, th: dict) -> None:
        res = self.res
        res.add(
            name,
            MEM,
            "ckptd daemon: RSS beyond shared slots",
            ck.get("daemon_private", 0),
            "B",
            f"VmHWM {ck.get('daemon_vmhwm', 0) / 2**20:.0f} MiB incl. "
            f"{ck.get('daemon_shmem', 0) / 2**20:.0f} MiB of mapped slots",
        )
        res.add(name, MEM, "ckptd trainer: RSS rise", ck["trainer_rss_rise"], "B", "arena slots")
        res.add(name, MEM, "ckptd: shared memory in use (rise)", ck["shmem_rise"], "B")
        res.add(name, MEM, "torch.save trainer: RSS rise", ts["trainer_rss_rise"], "B")
        res.add(name, MEM, "torch.save thread trainer: RSS rise", th["trainer_rss_rise"], "B")
        res.add(name, MEM, "dcp trainer: RSS rise", dcp["trainer_rss_rise"], "B")
        if st:
            res.add(
                name,
                MEM,
                "dcp+DefaultStager trainer: RSS rise",
                st["trainer_rss_rise"],
                "B",
                f"shared memory rise {st['shmem_rise'] / 2**20:.0f} MiB",
            )

    # ---- uploads ---------------------------------------------------------------------------

    def _uploads(self, ctx: R.Ctx) -> None:
        name = ctx.state.name
        log(f"{name}: uploads to moto_server")
        moto = self.infra.moto()
        os.environ.update(S3_ENV)
        os.environ["AWS_ENDPOINT_URL"] = moto.url
        bucket = bucket_name()
        upload, cleanup = R.boto3_uploader(moto.url, bucket)
        self._upload_one(ctx, UP_S3, f"s3://{bucket}", "boto3 upload_file", upload, cleanup, {})
        log(f"{name}: uploads to fake-gcs-server")
        gcs = self.infra.fake_gcs()
        os.environ["STORAGE_EMULATOR_HOST"] = gcs.url
        bucket = bucket_name()
        create_gcs_bucket(gcs.url, bucket)
        upload, cleanup = R.gcloud_uploader(gcs.url, bucket)
        self._upload_one(
            ctx, UP_GCS, f"gs://{bucket}", "gcloud-aio Storage.upload", upload, cleanup, {}
        )

    def _upload_one(
        self,
        ctx: R.Ctx,
        section: str,
        base: str,
        other: str,
        upload: Any,
        cleanup: Any,
        env: dict[str, str],
    ) -> None:
        name = ctx.state.name
        tag = section.split(",")[1].split()[0].lower()
        daemon = self.infra.daemon(f"{tag}-{name}", store=f"{base}/daemon", env=env)
        cr = R.start_ckptd(ctx, daemon.socket, daemon.root, "bench")
        try:
            up = R.run_upload(ctx, cr, base, other, upload, cleanup)
            cr.ckpt.close()
            daemon.stop(120)
        finally:
            daemon.kill()
        thr = up["throughput"]
        e2e = sorted(up["save_to_uploaded"])[len(up["save_to_uploaded"]) // 2]
        self.res.add(
            name,
            section,
            "ckptd daemon (committed -> uploaded)",
            thr["ckptd daemon"],
            "B/s",
            f"{up['bytes'] / 1e6:.0f} MB per checkpoint; save -> uploaded {e2e:.2f} s",
        )
        self.res.add(name, section, "ckptd store put_file (direct)", thr["ckptd put_file"], "B/s")
        self.res.add(name, section, other, thr[other], "B/s", "same files, same server")

    # ---- goals ---------------------------------------------------------------------------------

    def goals(self, gpt_cases: list[str], small_case: str | None) -> None:
        res, tag = self.res, self.tag
        ck = (BLOCK, CKPTD + tag)
        for c in gpt_cases:
            res.goal(
                "ckptd blocking / shm copy limit", c, res.ratio(c, ck, (BLOCK, LIMIT)), "<=", 1.25
            )
        for c in gpt_cases:
            res.goal(
                "ckptd blocking / dcp.async_save blocking",
                c,
                res.ratio(c, ck, (BLOCK, DCP_DEFAULT)),
                "<=",
                0.25,
            )
        for c in gpt_cases:
            res.goal(
                "ckptd blocking / torch.save",
                c,
                res.ratio(c, ck, (BLOCK, "torch.save")),
                "<=",
                0.10,
            )
        for c in gpt_cases:
            res.goal(
                "loop: ckptd extra time per save / copy time",
                c,
                res.ratio(c, (LOOP, "ckptd" + tag), (BLOCK, LIMIT)),
                "<=",
                0.2,
            )
        for c in gpt_cases:
            res.goal(
                "ckptd save -> committed / raw write + fsync",
                c,
                res.ratio(c, (DURABLE, CKPTD_COMMIT), (DURABLE, RAW)),
                "<=",
                1.15,
            )
        for c in gpt_cases:
            for section, other in (
                (UP_S3, "boto3 upload_file"),
                (UP_GCS, "gcloud-aio Storage.upload"),
            ):
                v = res.ratio(
                    c, (section, "ckptd daemon (committed -> uploaded)"), (section, other)
                )
                if v is not None:
                    short = "S3 vs boto3" if section == UP_S3 else "GCS vs gcloud-aio"
                    res.goal(
                        f"ckptd upload throughput / {other.split()[0]} ({short})", c, v, ">=", 1.0
                    )
        if gpt_cases:
            big = max(gpt_cases, key=lambda c: next(x.nbytes for x in res.cases if x.name == c))
            v = res.get(big, MEM, "ckptd daemon: RSS beyond shared slots")
            nbytes = next(x.nbytes for x in res.cases if x.name == big)
            note = "" if nbytes >= 2.9e9 else "largest state run here; the goal is stated for 3 GB"
            res.goal(
                "daemon peak RSS beyond the arena, MB",
                big,
                None if v is None else v / 1e6,
                "<=",
                300,
                note,
            )
        if small_case is not None:
            res.goal(
                "many small tensors: ckptd blocking / copy limit",
                small_case,
                res.ratio(small_case, ck, (BLOCK, LIMIT)),
                "<=",
                2.0,
            )


def _pinned(lim: dict[str, Any]) -> str:
    return "pinned, D2H + synchronize" if lim.get("pinned") else "torch._foreach_copy_, 2nd run on"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", module=r"torch\.distributed.*")
    res = Results()
    t_start = time.monotonic()
    with Infra(args.dir, keep=args.keep) as infra:
        res.meta = machine_meta(args, infra.dir)
        bench = Bench(args, infra, res)
        gpt_cases: list[str] = []
        small_case: str | None = None
        for size in args.size_list:
            for dtype in args.dtype_list:
                log(f"building a {size:g} GB {dtype} state on {args.device}")
                state = gpt_state(size, dtype, args.device)
                try:
                    bench.run_case(
                        state,
                        full=True,
                        loop=size in args.loop_list,
                        upload=size in args.upload_list and dtype == args.dtype_list[0],
                    )
                    gpt_cases.append(state.name)
                finally:
                    free(state)
                    del state
                    gc.collect()
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
        for n in args.small_list:
            state = small_state(n, args.device)
            try:
                full = n == 10000 and not args.quick
                bench.run_case(state, full=full, loop=False, upload=False)
                if n == 10000 or len(args.small_list) == 1:
                    small_case = state.name
            finally:
                free(state)
                del state
                gc.collect()
        bench.goals(gpt_cases, small_case)
        for size in args.restore_list:
            if args.device != "cpu":
                log("restore section: CPU only so far; skipped on --device cuda")
                break
            log(f"restore: building a {size:g} GB fp32 state")
            state = gpt_state(size, "fp32", "cpu")
            try:
                run_restore(infra, state, args.repeats, res)
            finally:
                free(state)
                del state
                gc.collect()
        for size in args.dedup_list:
            run_dedup(infra, size, args.repeats, res, device=args.device)
        res.meta["wall_s"] = round(time.monotonic() - t_start, 1)
        res.meta["load_end"] = load_average()
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(res.to_json())
    print(res.to_json() if args.json else res.to_text() + f"\n\n(total {res.meta['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
