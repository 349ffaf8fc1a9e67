"""``ckptd exec [--shutdown] -- CMD ...``: run a training job next to a daemon, drain, power off.

The auto-shutdown building block: the machine may go away only once every checkpoint is in its
store. So the power-off command runs only after a successful drain, or, when ``--force-after S``
is given, once S seconds of draining have passed (then what is left is logged loudly). A daemon
already answering on the socket is used as is; otherwise one is started for the job and stopped
(SIGTERM: it drains) at the end.

Exit code: the command's own if non-zero, else 1 if the drain failed, else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

from .defaults import default_root, default_socket, default_store
from .errors import CkptdError, ConfigError, DaemonUnavailableError, ProtocolError
from .spawn import DaemonProcess, socket_ready

log = logging.getLogger("ckptd.exec")

DEFAULT_POWEROFF = "systemctl poweroff"
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_DRAIN_STEP_S = 5.0  # one drain request per step: progress is logged and a dead daemon is noticed
_STOP_GRACE_S = 10.0  # after a failed drain: what is left stays on disk and resumes on restart


class _Interrupted(Exception):
    """A signal arrived while draining: give up waiting (the daemon keeps its state on disk)."""


def run_exec(
    argv_cmd: list[str],
    *,
    socket: str,
    root: str,
    store: str | None,
    shutdown: bool,
    poweroff_cmd: list[str],
    drain_timeout: float | None,
    force_after: float | None,
) -> int:
    """Run ``argv_cmd`` with ``CKPTD_SOCKET`` set, drain the daemon, and power off if asked."""
    if not argv_cmd:
        raise ConfigError("exec needs a command to run after --")
    if shutdown and not poweroff_cmd:
        raise ConfigError("--shutdown needs a power-off command")
    for name, value in (("drain timeout", drain_timeout), ("force-after", force_after)):
        if value is not None and value < 0:
            raise ConfigError(f"the {name} must not be negative")
    if force_after is not None and not shutdown:
        log.warning("--force-after has no effect without --shutdown")
    # The drain waits until the sooner of the two bounds; none means until nothing is pending.
    bounds = [b for b in (drain_timeout, force_after if shutdown else None) if b is not None]
    bound = min(bounds) if bounds else None

    daemon: DaemonProcess | None = None
    if socket_ready(socket):
        log.info("using the ckptd daemon already serving %s", socket)
        if store:
            log.warning("a daemon already serves %s: its own store applies, not %s", socket, store)
    else:
        args = ["--drain-timeout", str(max(bound, 1.0))] if bound is not None else []
        daemon = DaemonProcess(root, socket, store=store, args=args)
        log.info("started ckptd daemon (pid %d) on %s", daemon.pid, socket)

    drained, started = False, time.monotonic()
    try:
        code = _run_child(argv_cmd, socket)
        drained, started = _drain(socket, bound, keep_waiting=shutdown and force_after is not None)
    finally:
        if daemon is not None and _stop_daemon(daemon, drained=drained) != 0:
            drained = False

    if shutdown:
        waited = time.monotonic() - started
        if drained:
            log.info("drained: every checkpoint is in its store; powering off")
            if _power_off(poweroff_cmd) != 0 and code == 0:
                code = 1
        elif force_after is not None and waited >= force_after:
            log.critical(
                "FORCED POWER-OFF after %.0f s of draining: checkpoints are NOT all in the store; "
                "what is left stays on this machine's disk under the daemon's root",
                waited,
            )
            _power_off(poweroff_cmd)
        else:
            log.error(
                "NOT powering off: the drain failed and uploads are pending; fix the store and run "
                "`ckptd drain`, or power off by hand (or pass --force-after S)"
            )
    if code:
        return code
    return 0 if drained else 1


def _run_child(argv_cmd: list[str], socket: str) -> int:
    """Run the command to its end, forwarding SIGTERM/SIGINT/SIGHUP; return a shell-style code."""
    env = {**os.environ, "CKPTD_SOCKET": socket}
    proc: subprocess.Popen[bytes] | None = None
    early: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if proc is None:
            early.append(signum)
            return
        log.warning("passing %s on to the command", signal.Signals(signum).name)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    with _signals(forward):
        try:
            # Its own process group: a terminal's Ctrl-C reaches it once, through us, not twice.
            proc = subprocess.Popen(argv_cmd, env=env, process_group=0)
        except OSError as e:
            log.error("cannot run %s: %s", shlex.join(argv_cmd), e)
            return 127 if isinstance(e, FileNotFoundError) else 126
        for signum in early:
            proc.send_signal(signum)
        rc = proc.wait()
    if rc < 0:
        rc = 128 - rc  # killed by a signal: report it the way a shell does
    (log.info if rc == 0 else log.error)("%s exited with %d", shlex.join(argv_cmd), rc)
    return rc


def _drain(socket: str, bound: float | None, *, keep_waiting: bool) -> tuple[bool, float]:
    """Ask the daemon to drain, in steps; return (drained, monotonic start).

    Permanent upload failures end the wait early (nothing will change) unless ``keep_waiting``:
    with --force-after the machine goes off at the bound, whatever happens before it.
    """
    from .connection import Connection
    from .protocol import Drained, DrainRequest

    started = time.monotonic()
    deadline = None if bound is None else started + bound
    left: list[dict[str, Any]] = []

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise _Interrupted(signal.Signals(signum).name)

    try:
        with _signals(interrupt):
            conn = Connection(socket, 10.0)
            try:
                while True:
                    step = _DRAIN_STEP_S
                    if deadline is not None:
                        step = min(step, max(deadline - time.monotonic(), 0.0))
                    reply = conn.request(DrainRequest(timeout=step), timeout=step + 30)
                    if not isinstance(reply, Drained):
                        log.error("the daemon refused to drain: %s", getattr(reply, "error", reply))
                        break
                    if reply.ok:
                        return True, started
                    left = reply.pending
                    if deadline is not None and time.monotonic() >= deadline:
                        break
                    if all(j.get("state") == "failed" for j in left):
                        if not keep_waiting:
                            break
                        time.sleep(min(step, 1.0))  # only failures: wait out the bound quietly
                        continue
                    log.info("draining: %s", _summary(left))
            finally:
                conn.close()
    except (DaemonUnavailableError, ProtocolError) as e:
        log.error("drain failed: %s", e)
        return False, started
    except _Interrupted as e:
        log.error("drain interrupted by %s", e)
    for job in left:
        log.error(
            "not in its store: %s@%s (%s)%s",
            job.get("run"),
            job.get("tag"),
            job.get("state"),
            f": {job['error']}" if job.get("error") else "",
        )
    log.error("drain failed: %s", _summary(left) if left else "interrupted")
    return False, started


def _summary(jobs: list[dict[str, Any]]) -> str:
    total = sum(int(j.get("bytes_total") or 0) for j in jobs)
    done = sum(int(j.get("bytes_uploaded") or 0) for j in jobs)
    return f"{len(jobs)} checkpoint(s) not in their store, {total - done} of {total} bytes to go"


def _stop_daemon(daemon: DaemonProcess, *, drained: bool) -> int:
    """SIGTERM (the daemon drains and exits 0 only if all is uploaded); kill it if it lingers."""
    grace = 120.0 if drained else _STOP_GRACE_S
    try:
        code = daemon.stop(grace)
    except subprocess.TimeoutExpired:
        log.error("the daemon did not exit within %.0f s of SIGTERM; killing it", grace)
        daemon.kill()
        return 1
    if code != 0:
        log.error("the daemon exited with %d: not everything reached the store", code)
    return code


def _power_off(cmd: list[str]) -> int:
    log.warning("powering off: %s", shlex.join(cmd))
    try:
        rc = subprocess.run(cmd, check=False).returncode
    except OSError as e:
        log.error("cannot run the power-off command %s: %s", shlex.join(cmd), e)
        return 1
    if rc != 0:
        log.error("the power-off command %s exited with %d", shlex.join(cmd), rc)
        return 1
    return 0


@contextlib.contextmanager
def _signals(handler: Any) -> Iterator[None]:
    """Install ``handler`` for the forwarded signals (main thread only); restore on exit."""
    old: dict[int, Any] = {}
    try:
        for sig in _FORWARDED:
            old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: signals stay where they are
        log.debug("not in the main thread: signals are not forwarded")
    try:
        yield
    finally:
        for sig, prev in old.items():
            signal.signal(sig, prev)


# ---- CLI ------------------------------------------------------------------------------------------


def add_exec_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``exec`` subcommand's arguments (cli.py registers the verb and ``cmd_exec``)."""
    parser.add_argument(
        "--socket", default=default_socket(), help="daemon socket (default: %(default)s)"
    )
    parser.add_argument(
        "--root",
        default=default_root(),
        help="root for a daemon started by exec, when none is running (default: %(default)s)",
    )
    parser.add_argument(
        "--store",
        default=default_store(),
        help="store URL for a daemon started by exec (default: $CKPTD_STORE, else the root)",
    )
    parser.add_argument(
        "--shutdown",
        action="store_true",
        help="power the machine off after the command, once everything is uploaded",
    )
    parser.add_argument(
        "--poweroff-cmd",
        default=DEFAULT_POWEROFF,
        help="command that powers off (shell words; default: %(default)s)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        metavar="S",
        help="give up draining after S seconds: exit 1, and do not power off (default: wait)",
    )
    parser.add_argument(
        "--force-after",
        type=float,
        default=None,
        metavar="S",
        help="with --shutdown: power off after S seconds of draining even if uploads are pending",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...", help="the command to run"
    )


def cmd_exec(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    try:
        poweroff = shlex.split(args.poweroff_cmd)
    except ValueError as e:
        raise ConfigError(f"--poweroff-cmd: {e}") from None
    try:
        return run_exec(
            cmd,
            socket=args.socket,
            root=args.root,
            store=args.store,
            shutdown=args.shutdown,
            poweroff_cmd=poweroff,
            drain_timeout=args.drain_timeout,
            force_after=args.force_after,
        )
    except ConfigError:
        raise
    except CkptdError as e:  # e.g. the daemon could not start
        print(f"ckptd exec: {e}", file=sys.stderr)
        return 1


__all__ = ["DEFAULT_POWEROFF", "add_exec_arguments", "cmd_exec", "run_exec"]
