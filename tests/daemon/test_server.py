"""The wiring module in-process: what the daemon does when one of its own loops dies."""

from __future__ import annotations

import asyncio
import os

from ckptd.daemon.config import DaemonConfig
from ckptd.daemon.server import Daemon


async def test_a_dead_internal_loop_makes_the_daemon_exit_instead_of_looking_alive(
    tmp_path,
) -> None:  # type: ignore[no-untyped-def]
    """Before: the accept loop could die while the watchdog kept being pinged; now the daemon
    stops (exit 1, so systemd restarts it) and the watchdog loop ends."""
    daemon = Daemon(DaemonConfig(root=str(tmp_path), socket=os.path.join(tmp_path, "s.sock")))

    async def broken() -> None:
        raise OSError("accept failed for good")

    task = daemon._spawn(broken(), critical=True)
    await asyncio.wait({task})
    await asyncio.sleep(0)
    assert daemon.fatal and daemon._stop.is_set()
    watchdog = daemon._spawn(daemon._watchdog(0.01))
    await asyncio.wait_for(watchdog, 5)  # no more WATCHDOG=1 pings


async def test_an_ordinary_task_failing_is_logged_not_fatal(tmp_path) -> None:  # type: ignore[no-untyped-def]
    daemon = Daemon(DaemonConfig(root=str(tmp_path), socket=os.path.join(tmp_path, "s.sock")))

    async def broken() -> None:
        raise ValueError("one save's bug")

    task = daemon._spawn(broken())
    await asyncio.wait({task})
    await asyncio.sleep(0)
    assert not daemon.fatal and not daemon._stop.is_set()
