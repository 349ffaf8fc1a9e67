"""The ``ckptd`` command. Exit codes: 0 success, 1 the operation failed or is incomplete, 2 bad usage."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import time
from typing import Any

from . import __version__
from .defaults import default_root, default_socket, default_store
from .errors import (
    CkptdError,
    ConfigError,
    DaemonUnavailableError,
    IntegrityError,
    NotFoundError,
    ProtocolError,
)
from .protocol import Drained, DrainRequest, Event, Request, StatusReport, StatusRequest

log = logging.getLogger("ckptd")

EPILOG = """environment:
  CKPTD_SOCKET  daemon socket (default: $XDG_RUNTIME_DIR/ckptd/ckptd.sock or /tmp/ckptd-$UID/ckptd.sock)
  CKPTD_ROOT    daemon root directory (default: ~/.local/share/ckptd)
  CKPTD_STORE   default store URL: a path, file:///abs/path, s3://bucket/prefix, gs://bucket/prefix
  S3 endpoints and credentials follow botocore (AWS_ENDPOINT_URL, AWS_PROFILE, ...);
  GCS follows gcloud-aio (STORAGE_EMULATOR_HOST, GOOGLE_APPLICATION_CREDENTIALS).

exit codes: 0 success, 1 the operation failed or is incomplete, 2 bad usage"""


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _human(n: float) -> str:
    from .progress import human_bytes  # one formatting of sizes everywhere

    return human_bytes(n)


# ---- serve ---------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from .daemon.preempt import PreemptionConfig
    from .daemon.server import Daemon, DaemonConfig
    from .retention import Retention
    from .storage.options import StoreOptions

    _setup_logging(args.log_level)
    try:
        cfg = DaemonConfig(
            root=args.root,
            socket=args.socket,
            store=args.store,
            writers=args.writers,
            uploads=args.uploads,
            file_concurrency=args.file_concurrency,
            drain_timeout=args.drain_timeout,
            check_store=not args.no_check_store,
            group=args.group,
            mirror_max_file_size=args.mirror_max_file_size or None,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            retention=Retention(
                keep_last=args.keep_last,
                keep_every=args.keep_every,
                keep_optim_last=args.keep_optim_last,
                keep_best=args.keep_best,
                metric=args.keep_best_metric,
                mode=args.keep_best_mode,
            ),
            local_retention=keep_local_retention(args),
            blob_grace=args.blob_grace,
            upload_every=args.upload_every,
            store_options=StoreOptions(
                sse=args.sse, kms_key=args.kms_key, storage_class=args.storage_class
            ),
            upload_limit=read_upload_limit(args.upload_limit),
            preemption=PreemptionConfig(
                mode=args.preemption,
                aws_endpoint=args.aws_metadata_url,
                gce_endpoint=args.gce_metadata_url,
                poll_interval=args.preemption_poll,
            ),
        )
        nice = args.nice if args.nice is not None else _env_nice()
        if cfg.store:
            from .storage import open_store

            open_store(cfg.store)  # a bad URL is a usage error, before anything starts
    except ConfigError as e:
        print(f"ckptd serve: {e}", file=sys.stderr)
        return 2

    _lower_priority(nice)

    async def main() -> int:
        return await Daemon(cfg).run()

    try:
        return asyncio.run(main())
    except CkptdError as e:
        print(f"ckptd serve: {e}", file=sys.stderr)
        return 1


def keep_local_retention(args: argparse.Namespace) -> Any:
    """``--keep-local N|all`` (``--local-keep-last N``, its older spelling, still works)."""
    from .daemon.config import KEEP_LOCAL
    from .retention import Retention

    raw = args.keep_local
    if raw is None:
        raw = str(args.local_keep_last) if args.local_keep_last is not None else str(KEEP_LOCAL)
    if raw.strip().lower() == "all":
        return Retention()
    try:
        n = int(raw)
    except ValueError:
        raise ConfigError(f"--keep-local takes a number or 'all', not {raw!r}") from None
    return Retention(keep_last=n)


def read_upload_limit(raw: str | None) -> float | None:
    from .daemon.bandwidth import parse_rate

    if raw is None or raw.strip().lower() in ("", "none", "off"):
        return None
    return parse_rate(raw)


def _env_nice() -> int:
    raw = os.environ.get("CKPTD_NICE") or "10"
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"CKPTD_NICE must be an integer, not {raw!r}") from None


def _lower_priority(nice: int) -> None:
    """Let the training processes have the CPU first: a save wakes the daemon's writer and
    checksum threads exactly when the loop resumes, and on a busy node they would take its
    cores. Idle CPU is still the daemon's, so commits and uploads are as fast as before."""
    if nice <= 0:
        return
    try:
        now = os.nice(nice)
    except OSError as e:
        log.warning("could not lower the daemon's CPU priority (nice +%d): %s", nice, e)
        return
    log.info("running at nice %d: training processes get the CPU first", now)


# ---- talking to a running daemon -------------------------------------------------------------------


def _request(socket_path: str, msg: Request, timeout: float | None) -> Event:
    from .connection import Connection

    conn = Connection(socket_path, 10.0)
    try:
        return conn.request(msg, timeout=timeout)
    finally:
        conn.close()


def _job_line(j: dict[str, Any]) -> str:
    from .statusview import job_line

    return "  " + job_line(j)


def _print_status(st: dict[str, Any]) -> None:
    """The status screen once: cut to the terminal on a TTY, whole into a pipe."""
    from .statusview import render

    if sys.stdout.isatty():
        size = shutil.get_terminal_size()
        lines = render(st, size.columns, max(size.lines - 1, 1))
    else:
        lines = render(st, None, None)
    print("\n".join(lines))


def _watch_frame(st: dict[str, Any]) -> str:
    """One --watch frame: home, each line cleared to its end, the rest of the screen cleared;
    one row is left for the cursor, so the header never scrolls off."""
    from .statusview import render

    size = shutil.get_terminal_size()
    lines = render(st, size.columns, max(size.lines - 1, 1))
    return "\033[H" + "".join(f"{line}\033[K\n" for line in lines) + "\033[J"


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch and not args.json:
        return _watch(args)
    try:
        while True:
            st = _status_reply(args.socket)
            if args.json:
                print(json.dumps(st, indent=1))
            else:
                _print_status(st)
            if not args.watch:
                return 0
            sys.stdout.flush()
            time.sleep(args.interval)
    except (DaemonUnavailableError, ProtocolError) as e:
        print(f"ckptd status: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _status_reply(socket_path: str) -> dict[str, Any]:
    reply = _request(socket_path, StatusRequest(), 30.0)
    if not isinstance(reply, StatusReport):
        raise ProtocolError(f"{getattr(reply, 'error', reply)}")
    return {k: v for k, v in reply.to_wire().items() if k not in ("ev", "rid")}


def _watch(args: argparse.Namespace) -> int:
    """Redraw in place until Ctrl-C (exit 0). A daemon that goes away after the first frame
    (a restart) is waited for, saying so, rather than ending the watch."""
    shown = False
    sys.stdout.write("\033[2J\033[?25l")  # clear once, hide the cursor while redrawing
    try:
        while True:
            try:
                frame = _watch_frame(_status_reply(args.socket))
                shown = True
            except (DaemonUnavailableError, ProtocolError) as e:
                if not shown:
                    sys.stdout.write("\033[?25h")
                    print(f"ckptd status: {e}", file=sys.stderr)
                    return 1
                note = f"ckptd status: daemon at {args.socket} not answering ({e}); retrying"
                frame = f"\033[H{note[: shutil.get_terminal_size().columns - 1]}\033[K\n\033[J"
            sys.stdout.write(frame)
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        sys.stdout.write("\033[?25h")
        sys.stdout.flush()


def cmd_drain(args: argparse.Namespace) -> int:
    try:
        reply = _request(
            args.socket,
            DrainRequest(timeout=args.timeout),
            None if args.timeout is None else args.timeout + 30,
        )
    except DaemonUnavailableError as e:
        # Nothing uploads while no daemon runs: say what does work now.
        print(f"ckptd drain: {e}\n  (what a root owes uploads once a daemon runs on it; to give "
              "an upload up instead: `ckptd abandon --root DIR RUN@TAG`)", file=sys.stderr)  # fmt: skip
        return 1
    except ProtocolError as e:
        print(f"ckptd drain: {e}", file=sys.stderr)
        return 1
    if not isinstance(reply, Drained):
        print(f"ckptd drain: {getattr(reply, 'error', reply)}", file=sys.stderr)
        return 1
    if reply.ok:
        print("drained: nothing pending")
        return 0
    from .daemon.reasons import explain, stuck_advice

    for line in explain(reply.pending):
        print(f"not drained: {line}", file=sys.stderr)
    for j in reply.pending:
        print(_job_line(j), file=sys.stderr)
    if advice := stuck_advice(reply.pending, f"--socket {args.socket}"):
        print(advice, file=sys.stderr)
    return 1


def cmd_abandon(args: argparse.Namespace) -> int:
    """Give up owed uploads on purpose: the root's record says so; a running daemon stops."""
    from .daemon.abandon import abandon
    from .names import check_name
    from .spawn import socket_ready

    run, at, tag = args.checkpoint.rpartition("@")
    if not at:
        run, tag = args.checkpoint, ""
    check_name(run, "run")
    if tag:
        check_name(tag, "tag")
    root, live = args.root, False
    if socket_ready(args.socket):  # a running daemon's own root, whatever --root says
        try:
            reply = _request(args.socket, StatusRequest(), 30.0)
        except (DaemonUnavailableError, ProtocolError):
            reply = None
        if isinstance(reply, StatusReport):
            root, live = reply.to_wire()["root"], True
    done = abandon(root, run, tag or None, by=f"ckptd abandon (pid {os.getpid()})")
    if not done:
        what = f"{run}@{tag}" if tag else f"run {run}"
        print(f"ckptd abandon: no upload of {what} is owed in {root}", file=sys.stderr)
        return 1
    keys = {f"{r}@{t}" for r, t, _ in done}
    if live:  # the daemon notices within a second; say when it has let go
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline:
            try:
                reply = _request(args.socket, DrainRequest(timeout=0), 30.0)
            except (DaemonUnavailableError, ProtocolError):
                break
            if not isinstance(reply, Drained):
                break
            if not any(f"{j['run']}@{j['tag']}" in keys for j in reply.pending):
                break
            time.sleep(0.2)
    for r, t, store in done:
        print(f"abandoned the upload of {r}@{t} to {store}; the local copy stays in {root}")
    return 0


# ---- reading stores ------------------------------------------------------------------------------------


def _total_bytes(manifest: dict[str, Any]) -> int:
    return sum(int(f["size"]) for f in manifest["files"].values())


def cmd_ls(args: argparse.Namespace) -> int:
    from .blobs import new_bytes
    from .catalog import list_checkpoints, list_runs
    from .experiment import list_records

    manifests = list_checkpoints(args.url)
    records = list_records(args.url)
    if manifests or records:
        fresh = new_bytes(manifests)  # oldest first: a shared file is new where first listed
        if args.json:
            rows = [
                {**m, "total_bytes": _total_bytes(m), "new_bytes": n}
                for m, n in zip(manifests, fresh, strict=True)
            ]
            print(json.dumps({"checkpoints": rows, "records": records}, indent=1))
            return 0
        if manifests:
            print(f"{'TAG':<30} {'STEP':>10} {'SIZE':>12} {'NEW':>12}  CREATED")
        for m, n in zip(manifests, fresh, strict=True):
            size = _total_bytes(m)
            print(
                f"{m['tag']:<30} {m.get('step', '?'):>10} {_human(size):>12} {_human(n):>12}  "
                f"{m.get('created', '?')}"
            )
        if records:
            print(f"\n{'RECORD (experiment/)':<42} {'SIZE':>12}")
            for key, size in records:
                print(f"{key:<42} {_human(size):>12}")
        return 0
    runs = list_runs(args.url)
    if args.json:
        print(json.dumps(runs))
        return 0 if runs else 1
    if not runs:
        print(f"no checkpoints under {args.url}", file=sys.stderr)
        return 1
    for run in runs:
        print(run)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .catalog import split_tag, verify

    url, tag = split_tag(args.url)
    loc = verify(url, tag)
    n = len(loc.manifest["files"])
    print(
        f"ok: {loc.url}@{loc.tag} (step {loc.manifest.get('step')}), {n} files match the manifest"
    )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from .catalog import check_dest, copy_checkpoint, split_tag

    url, tag = split_tag(args.url)
    try:
        check_dest(args.dest)  # the operation cannot be done as asked: 1, not a usage error
    except ConfigError as e:
        print(f"ckptd restore: {e}", file=sys.stderr)
        return 1
    loc = copy_checkpoint(url, tag, args.dest)
    print(f"restored {loc.url}@{loc.tag} (step {loc.manifest.get('step')}) into {args.dest}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _setup_logging(args.log_level)
    return run_demo(args)


# ---- parser ----------------------------------------------------------------------------------------------


def _retention_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--keep-last",
        type=int,
        default=None,
        metavar="N",
        help="keep the newest N checkpoints per run in the store (default: all)",
    )
    sp.add_argument(
        "--keep-every",
        type=int,
        default=None,
        metavar="K",
        help="also keep every checkpoint whose step is a multiple of K",
    )
    sp.add_argument(
        "--keep-optim-last",
        type=int,
        default=None,
        metavar="M",
        help="keep optimizer state only in the newest M checkpoints: the one rewrite of a "
        "committed checkpoint (its MANIFEST.json is rewritten to list fewer files; the files it "
        "still lists are untouched)",
    )
    sp.add_argument(
        "--keep-best",
        type=int,
        default=None,
        metavar="B",
        help="also keep the best B checkpoints by --keep-best-metric (a checkpoint that lacks the "
        "metric never counts as best); without --keep-last, every checkpoint that is neither best "
        "nor the newest is deleted. The newest checkpoint is always kept",
    )
    sp.add_argument(
        "--keep-best-metric",
        default=None,
        metavar="NAME",
        help="the metric that ranks for --keep-best, as recorded by save(..., metrics={NAME: x}), "
        "e.g. val_loss",
    )
    sp.add_argument(
        "--keep-best-mode",
        choices=["min", "max"],
        default="min",
        help="min: lower is better (a loss); max: higher is better (an accuracy) "
        "(default: %(default)s)",
    )
    sp.add_argument(
        "--blob-grace",
        type=float,
        default=3600.0,
        metavar="S",
        help="keep shared data (<run>/shared/, what incremental checkpoints reference) that no "
        "checkpoint lists yet for S seconds after it was written: another writer's save of the "
        "run (a DCP rank on another node) may be about to list it. The local root, which only "
        "this daemon writes, needs no grace (default: 3600)",
    )


def cmd_gc(args: argparse.Namespace) -> int:
    from .catalog import list_checkpoints, list_runs, run_sync
    from .retention import Plan, Retention, apply, collect_blobs
    from .storage import join_key, open_store

    policy = Retention(keep_last=args.keep_last, keep_every=args.keep_every,
                       keep_optim_last=args.keep_optim_last, keep_best=args.keep_best,
                       metric=args.keep_best_metric, mode=args.keep_best_mode)  # fmt: skip
    if list_checkpoints(args.url):
        base, _, run = args.url.rstrip("/").rpartition("/")
        runs = [run]
    else:
        base, runs = args.url, list_runs(args.url)
    verb = ("would delete", "would drop") if args.dry_run else ("deleted", "dropped")

    async def go() -> tuple[int, int, int, int]:
        deleted = slimmed = aborted = blobs = 0
        async with open_store(base) as store:
            for run in runs:
                if policy.active:
                    done = await apply(store, run, policy, dry_run=args.dry_run,
                                       blob_grace=args.blob_grace, collect=True)  # fmt: skip
                else:
                    done = Plan([], [])
                    done.blobs = await collect_blobs(
                        store, run, grace=args.blob_grace, dry_run=args.dry_run
                    )
                for m in done.delete:
                    print(f"{verb[0]} {run}@{m['tag']}")
                for m in done.strip_optim:
                    print(f"{verb[1]} optimizer state of {run}@{m['tag']}")
                for name in done.blobs:
                    print(f"{verb[0]} {run}/shared/{name} (no checkpoint lists it)")
                deleted += len(done.delete)
                slimmed += len(done.strip_optim)
                blobs += len(done.blobs)
                if not args.dry_run:
                    aborted += await store.abort_stale_uploads(
                        join_key(run, "") + "/", args.stale_hours * 3600
                    )
        return deleted, slimmed, aborted, blobs

    deleted, slimmed, aborted, blobs = run_sync(go())
    if args.dry_run:
        print(f"gc {args.url} (dry run, nothing changed): {len(runs)} run(s); would delete "
              f"{deleted} checkpoint(s) and {blobs} unlisted shared file(s), would slim "
              f"{slimmed}")  # fmt: skip
        return 0
    print(f"gc {args.url}: {len(runs)} run(s); {deleted} checkpoint(s) deleted, "
          f"{blobs} unlisted shared file(s) deleted, {slimmed} slimmed, "
          f"{aborted} stale upload(s) aborted")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="ckptd",
        description="Stall-free, crash-safe PyTorch checkpoints through a node-local daemon.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    p.add_argument("--version", action="version", version=f"ckptd {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def add(name: str, help_: str, fn: Any) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_, epilog=EPILOG, formatter_class=fmt)
        sp.set_defaults(fn=fn)
        return sp

    def sock(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--socket", default=default_socket(), help="daemon socket (default: %(default)s)"
        )

    s = add("serve", "run the daemon: commit staged checkpoints locally, upload them", cmd_serve)
    s.add_argument(
        "--root", default=default_root(), help="local checkpoint root (default: %(default)s)"
    )
    sock(s)
    s.add_argument(
        "--store",
        default=default_store(),
        help="default store URL for uploads (default: $CKPTD_STORE, else the root itself)",
    )
    s.add_argument(
        "--sse",
        default=None,
        help="S3 server-side encryption of every object written: AES256, aws:kms or "
        "aws:kms:dsse (docs/stores.md)",
    )
    s.add_argument(
        "--kms-key",
        default=None,
        help="S3: the SSE-KMS key id or ARN (with --sse aws:kms); GCS: the CMEK kmsKeyName",
    )
    s.add_argument(
        "--storage-class",
        default=None,
        help="storage class of every object written (S3: STANDARD_IA, INTELLIGENT_TIERING...; "
        "GCS: NEARLINE...); recorded in each manifest",
    )
    s.add_argument(
        "--writers", type=int, default=2, help="checkpoints written at once (default: 2)"
    )
    s.add_argument(
        "--uploads", type=int, default=2, help="checkpoints uploaded at once (default: 2)"
    )
    s.add_argument(
        "--file-concurrency", type=int, default=4, help="files in flight per upload (default: 4)"
    )
    s.add_argument(
        "--drain-timeout",
        type=float,
        default=80.0,
        help="seconds SIGTERM may spend finishing uploads (default: 80)",
    )
    s.add_argument(
        "--no-check-store", action="store_true", help="skip the store access check at start"
    )
    s.add_argument(
        "--preemption",
        default=os.environ.get("CKPTD_PREEMPTION") or "auto",
        help="watch spot/preemption notices: auto (detect AWS/GCE from DMI, then confirm), aws, "
        "gce or off (default: $CKPTD_PREEMPTION, else auto)",
    )
    s.add_argument(
        "--aws-metadata-url",
        default="http://169.254.169.254",
        help="IMDSv2 base URL (default: %(default)s)",
    )
    s.add_argument(
        "--gce-metadata-url",
        default="http://metadata.google.internal",
        help="GCE metadata base URL (default: %(default)s)",
    )
    s.add_argument(
        "--preemption-poll",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds between AWS spot notice polls (default: 5)",
    )
    _retention_args(s)
    s.add_argument(
        "--keep-local",
        default=None,
        metavar="N|all",
        help="when uploading elsewhere, keep the newest N checkpoints per run in the root; an "
        "older copy is deleted only once its upload is verified (a copy still owed is never "
        "deleted, nor the newest). 'all' keeps every local copy (default: 3)",
    )
    s.add_argument("--local-keep-last", type=int, default=None, help=argparse.SUPPRESS)
    s.add_argument(
        "--upload-every",
        type=int,
        default=1,
        metavar="K",
        help="upload only every K-th committed checkpoint of a run and keep all of them locally; "
        "the newest one is uploaded anyway at drain, SIGTERM and on a preemption notice "
        "(default: 1, every checkpoint)",
    )
    s.add_argument(
        "--upload-limit",
        default=os.environ.get("CKPTD_UPLOAD_LIMIT"),
        metavar="RATE",
        help="upload bandwidth shared by all uploads of the daemon, e.g. 100MB/s, 50MiB/s, "
        "800Mbit/s (default: $CKPTD_UPLOAD_LIMIT, else unlimited)",
    )
    s.add_argument(
        "--nice",
        type=int,
        default=None,
        metavar="N",
        help="lower the daemon's CPU priority by N, so the training loop gets the CPU first "
        "(default: $CKPTD_NICE, else 10; 0 keeps it)",
    )
    s.add_argument(
        "--mirror-max-file-size",
        type=int,
        default=1 << 30,
        metavar="BYTES",
        help="experiment files larger than this are not mirrored to the store, with a log line "
        "(default: 1 GiB; 0: no cap)",
    )
    s.add_argument(
        "--group",
        default=None,
        metavar="GROUP",
        help="share the socket, root and files with this group (mode 0660/0750; clients of "
        "other users set CKPTD_DAEMON_USER to this daemon's user). Default: owner-only",
    )
    s.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus/OpenMetrics metrics on http://HOST:PORT/metrics (default: off)",
    )
    s.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address of the metrics endpoint (default: %(default)s, loopback only)",
    )
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    s = add("status", "show the daemon's queue, bytes and per-checkpoint state", cmd_status)
    sock(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--watch", action="store_true", help="refresh until interrupted")
    s.add_argument(
        "--interval", type=float, default=1.0, help="seconds between refreshes (default: 1)"
    )

    s = add("drain", "block until every checkpoint is committed and uploaded", cmd_drain)
    sock(s)
    s.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up after S seconds: exit 1 and list what is pending",
    )

    s = add(
        "abandon",
        "give up an owed upload on purpose: the local copy stays, the root records it, and a "
        "running daemon, drain and exec stop waiting for it",
        cmd_abandon,
    )
    sock(s)
    s.add_argument(
        "--root",
        default=default_root(),
        help="the daemon's root when no daemon answers on --socket (default: %(default)s)",
    )
    s.add_argument(
        "checkpoint", metavar="RUN[@TAG]", help="one checkpoint, or every owed one of RUN"
    )

    from .execcmd import add_exec_arguments, cmd_exec

    s = add(
        "exec", "run a command next to the daemon, drain, and with --shutdown power off", cmd_exec
    )
    add_exec_arguments(s)

    s = add(
        "ls",
        "list the runs of a store, or the checkpoints of a run (SIZE: every file it needs; "
        "NEW: the bytes it stored first, shared data that an older checkpoint lists not counted)",
        cmd_ls,
    )
    s.add_argument(
        "url", help="a store or run URL: a path, file:///..., s3://bucket/prefix, gs://..."
    )
    s.add_argument("--json", action="store_true")

    s = add(
        "verify",
        "check a checkpoint's files against its manifest (exit 1 naming a bad file)",
        cmd_verify,
    )
    s.add_argument("url", help="RUN_URL[@TAG] (default tag: latest)")

    s = add("restore", "copy a verified checkpoint into a local directory", cmd_restore)
    s.add_argument("url", help="RUN_URL[@TAG] (default tag: latest)")
    s.add_argument("dest", help="local directory to create")

    s = add(
        "gc", "apply retention to a store (or one run) and abort stale multipart uploads", cmd_gc
    )
    s.add_argument("url", help="a store URL or one run's URL")
    _retention_args(s)
    s.add_argument(
        "--stale-hours",
        type=float,
        default=24.0,
        help="abort unfinished uploads older than this (default: 24)",
    )
    s.add_argument(
        "--dry-run", action="store_true", help="say what would be deleted, delete nothing"
    )

    s = add("demo", "train a small model with a daemon on a local store, end to end", cmd_demo)
    s.add_argument("--dir", default=None, help="working directory (default: a new temporary one)")
    s.add_argument("--steps", type=int, default=40, help="training steps (default: 40)")
    s.add_argument("--every", type=int, default=10, help="save every N steps (default: 10)")
    s.add_argument("--width", type=int, default=512, help="model width (default: 512)")
    s.add_argument("--keep", action="store_true", help="keep the working directory")
    s.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args))
    except ConfigError as e:
        print(f"ckptd {args.verb}: {e}", file=sys.stderr)
        return 2
    except (IntegrityError, NotFoundError) as e:
        print(f"ckptd {args.verb}: {e}", file=sys.stderr)
        return 1
    except CkptdError as e:
        print(f"ckptd {args.verb}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1
    except BrokenPipeError:
        os._exit(1)
