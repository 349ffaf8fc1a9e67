"""``ckptd exec [--shutdown] -- CMD ...``: run a training job next to a daemon, drain, power off.

The auto-shutdown building block: the machine may go away only once every checkpoint is in its
store. So the power-off command runs only after a successful drain, or, when ``--force-after S``
is given, once S seconds of draining have passed (then what is left is logged loudly). A daemon
already answering on the socket is used as is; otherwise one is started for the job and stopped
(SIGTERM: it drains) at the end.

Stale uploads: checkpoints the daemon already owed when the job started (an earlier job's,
left by an earlier mistake) never hold the job up. exec waits for the checkpoints saved during
the job only; stale ones left at the end are reported (with why, and how to give them up:
``ckptd abandon``) and the machine is powered off anyway: they stay on its disk and a daemon
started on the same root owes them again. Advice for what is left names a command that works
at that moment: ``ckptd drain`` only while a daemon answers, else how to start one again.

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
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from .daemon.reasons import explain, stuck
from .defaults import default_root, default_socket, default_store
from .errors import CkptdError, ConfigError, DaemonUnavailableError, ProtocolError
from .spawn import DaemonProcess, socket_ready

log = logging.getLogger("ckptd.exec")

DEFAULT_POWEROFF = "systemctl poweroff"
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_DRAIN_STEP_S = 5.0  # one drain request per step: progress is logged and a dead daemon is noticed
_STOP_GRACE_S = 10.0  # after a failed drain: what is left stays on disk and resumes on restart
_REPORT_EVERY_S = 30.0  # a progress line while draining: at most this often, unless it changes


@dataclass(slots=True)
class DrainResult:
    """What a drain left: ``drained`` when every checkpoint of this job is in its store."""

    drained: bool
    started: float  # monotonic
    own: list[dict[str, Any]] = field(default_factory=list)  # this job's, not in their store
    stale: list[dict[str, Any]] = field(default_factory=list)  # owed from before the job


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

    result = DrainResult(False, time.monotonic())
    try:
        stale = _owed_now(socket)
        code = _run_child(argv_cmd, socket)
        result = _drain(
            socket, bound, keep_waiting=shutdown and force_after is not None, stale=stale
        )
    finally:
        if daemon is not None:
            rc = _stop_daemon(daemon, drained=result.drained and not result.stale)
            if rc != 0 and not (result.drained and result.stale):  # stale ones: expected
                result.drained = False
    drained = result.drained
    if drained and result.stale:
        _report_stale(result.stale, socket, root, daemon is not None)

    if shutdown:
        waited = time.monotonic() - result.started
        if drained:
            log.info("drained: every checkpoint of this job is in its store; powering off")
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
                "NOT powering off: %s of this job are not in their store. %s Or power off by "
                "hand (or pass --force-after S)",
                f"{len(result.own)} checkpoint(s)" if result.own else "checkpoints",
                _advice(result.own, socket, root, store, started_daemon=daemon is not None),
            )
    elif not drained:
        log.error("%s", _advice(result.own, socket, root, store, started_daemon=daemon is not None))
    if code:
        return code
    return 0 if drained else 1


def _owed_now(socket: str) -> set[str]:
    """The keys of checkpoints the daemon owes before the job starts: stale for this job."""
    from .connection import Connection
    from .protocol import Drained, DrainRequest

    try:
        conn = Connection(socket, 10.0)
        try:
            reply = conn.request(DrainRequest(timeout=0), timeout=30)
        finally:
            conn.close()
    except (DaemonUnavailableError, ProtocolError) as e:
        log.warning("could not ask the daemon what it owes already: %s", e)
        return set()
    if not isinstance(reply, Drained):
        return set()
    owed = {_key(j) for j in reply.pending}
    if owed:
        log.warning(
            "the daemon already owes %d checkpoint(s) from before this job; they will not hold "
            "up this job's drain or power-off: %s",
            len(owed),
            "; ".join(explain(reply.pending)),
        )
    return owed


def _key(j: dict[str, Any]) -> str:
    return f"{j.get('run')}@{j.get('tag')}" + (f"#{j['part']}" if j.get("part") else "")


def _where(socket: str, root: str) -> str:
    """How a command reaches the daemon now: its socket while it answers, else its root."""
    return (
        f"--socket {shlex.quote(socket)}" if socket_ready(socket) else f"--root {shlex.quote(root)}"
    )


def _advice(
    left: list[dict[str, Any]], socket: str, root: str, store: str | None, *, started_daemon: bool
) -> str:
    """What to do about ``left``, naming commands that work at this moment."""
    first = next((f"{j.get('run')}@{j.get('tag')}" for j in left if not j.get("part")), "RUN@TAG")
    if socket_ready(socket):
        return (
            f"The daemon on {socket} keeps retrying: fix the store, then `ckptd drain --socket "
            f"{shlex.quote(socket)}`; or give an upload up on purpose (the local copy stays): "
            f"`ckptd abandon --socket {shlex.quote(socket)} {first}`."
        )
    serve = f"ckptd serve --root {shlex.quote(root)} --socket {shlex.quote(socket)}"
    if store:
        serve += f" --store {shlex.quote(store)}"
    who = "The daemon this exec started" if started_daemon else f"No daemon answers on {socket}; it"
    return (
        f"{who} has exited; what is left stays in {root} and is owed again by the next daemon on "
        f"that root. Start one (`{serve} &`) and run `ckptd drain --socket {shlex.quote(socket)}`"
        f"; or give an upload up on purpose: `ckptd abandon --root {shlex.quote(root)} {first}`."
    )


def _report_stale(stale: list[dict[str, Any]], socket: str, root: str, started: bool) -> None:
    for line in explain(stale):
        log.warning("left from before this job (not holding up power-off): %s", line)
    first = next((f"{j.get('run')}@{j.get('tag')}" for j in stale if not j.get("part")), "RUN@TAG")
    log.warning(
        "they stay on this machine's disk under %s and are owed again when a daemon starts on "
        "it; to give them up: `ckptd abandon %s %s`",
        root,
        _where(socket, root),
        first,
    )


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


def _drain(socket: str, bound: float | None, *, keep_waiting: bool, stale: set[str]) -> DrainResult:
    """Ask the daemon to drain, in steps, until this job's checkpoints are in their store.

    Checkpoints in ``stale`` (owed before the job) are not waited for. Checkpoints that waiting
    will not bring into the store (failed, or a store that said no: ``reasons.stuck``) end the
    wait early unless ``keep_waiting``: with --force-after the machine goes off at the bound.
    """
    from .connection import Connection
    from .protocol import Drained, DrainRequest

    res = DrainResult(False, time.monotonic())
    deadline = None if bound is None else res.started + bound
    said, said_at = "", 0.0

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
                    res.own = [j for j in reply.pending if _key(j) not in stale]
                    res.stale = [j for j in reply.pending if _key(j) in stale]
                    if reply.ok or (res.stale and not res.own):
                        res.drained = True
                        return res
                    if deadline is not None and time.monotonic() >= deadline:
                        break
                    if all(stuck(j) for j in res.own):
                        if not keep_waiting:
                            break
                        time.sleep(min(step, 1.0))  # only failures: wait out the bound quietly
                        continue
                    # A line when the story changes, else every _REPORT_EVERY_S: not every step.
                    story = "; ".join(sorted({_why(j) for j in res.own}))
                    if story != said or time.monotonic() - said_at >= _REPORT_EVERY_S:
                        log.info("draining: %s", "; ".join(explain(res.own)))
                        said, said_at = story, time.monotonic()
            finally:
                conn.close()
    except (DaemonUnavailableError, ProtocolError) as e:
        log.error("drain failed: %s", e)
        return res
    except _Interrupted as e:
        log.error("drain interrupted by %s", e)
    for job in res.own:
        log.error(
            "not in its store: %s@%s (%s)%s",
            job.get("run"),
            job.get("tag"),
            job.get("reason") or job.get("state"),
            f": {job['error']}" if job.get("error") else "",
        )
    log.error("drain failed: %s", "; ".join(explain(res.own)) if res.own else "interrupted")
    return res


def _why(j: dict[str, Any]) -> str:
    return str(j.get("reason") or j.get("state"))


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
        help="power the machine off after the command, once every checkpoint it saved is uploaded "
        "(uploads the daemon owed from before the job are reported, never waited for)",
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
