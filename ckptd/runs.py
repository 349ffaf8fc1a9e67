"""Runs of an experiment: which run a rerun continues, and whether a run's writer is alive.

``Experiment(resume="auto")`` continues the newest run of its project/name that did not finish.
Finding it means listing runs locally and in the store, reading each ``run.json``, and telling a
killed run from a live one: a folder lock (``flock``, dropped by the kernel when its process
dies) and the writer's host, pid and process start time. A killed run reads ``interrupted``.
Metrics that an earlier attempt logged after the restored checkpoint are split off
(``split_metrics``), so the resumed run's ``metrics.jsonl`` has each step once.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from .atomic import temp_name
from .errors import CkptdError, ConfigError, NotFoundError
from .names import check_name
from .storage import is_local, join_key, local_path, open_store

log = logging.getLogger("ckptd.experiment")


def run_url(url: str) -> str:
    from .catalog import normalize_url, split_tag

    base, _ = normalize_url(split_tag(url)[0])
    return base


class Resume(enum.StrEnum):
    """What ``Experiment(resume=...)`` does with earlier runs of the same project/name."""

    AUTO = "auto"
    """Continue the newest run that is not ``finished`` and has no live writer; else a new run."""
    NEVER = "never"
    """Always start a new run."""


HEARTBEAT_S = 30.0  # run.json's heartbeat is refreshed by flush() at most this often
STALE_S = 600.0  # another host's "running" run silent this long reads "interrupted"
SUPERSEDED = "metrics.superseded.jsonl"


def boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def process_identity(pid: int) -> str | None:
    """Boot id + the process's start time: a pid reused after a crash or a reboot differs."""
    boot = boot_id()
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return f"{boot}/{fields[19]}" if boot and len(fields) > 19 else None


def writer_alive(record: Mapping[str, Any]) -> bool | None:
    """Whether the process that wrote ``record`` still runs; None when it ran on another host."""
    if record.get("host") != socket.gethostname():
        return None
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    ident = record.get("process")
    if ident and boot_id() is not None:
        return process_identity(pid) == ident
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def iso_age(stamp: Any) -> float | None:
    try:
        return time.time() - _dt.datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return None


def resolved_status(record: Mapping[str, Any], *, locked: bool = False) -> str:
    """``run.json``'s status as it stands: a ``running`` run whose writer is gone reads
    ``interrupted`` (same host: its process is gone; another host: no heartbeat for
    ``STALE_S``). ``locked``: a process on this host holds the folder's lock."""
    status = str(record.get("status", "running"))
    if status != "running" or locked:
        return status
    alive = writer_alive(record)
    if alive is None:
        age = iso_age(record.get("heartbeat") or record.get("attempt_started"))
        return "interrupted" if age is None or age > STALE_S else "running"
    return "running" if alive else "interrupted"


def lock_folder(path: str, exclusive: bool) -> int | None:
    """flock the folder for this process's lifetime (the kernel drops it when the process
    dies, SIGKILL included); None when another process holds it."""
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def locked_by_other(path: str) -> bool:
    """Whether a run continued by ``resume="auto"`` holds the folder (a shared probe, so that
    looking never makes a process that is taking the run fail to)."""
    if not os.path.isdir(path):
        return False
    fd = lock_folder(path, exclusive=False)
    if fd is None:
        return True
    os.close(fd)
    return False


def read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def valid_stamp(stamp: str) -> bool:
    """A run's last part as ``check_name`` allows it: anything else (``..``, ``.ckptd``, a
    stray file) is no run of ours, and must never become a path."""
    try:
        check_name(stamp, "run")
    except ConfigError:
        return False
    return "/" not in stamp


def store_run_url(store: str, run: str) -> str:
    return join_key(store, run) if "://" in store else os.path.join(store, run)


@dataclasses.dataclass(slots=True)
class FoundRun:
    """An earlier run of this project/name: its record, and whether it is on this disk."""

    stamp: str
    record: dict[str, Any]
    local: bool


def store_records(store: str, prefix: str, stamp: str | None) -> dict[str, dict[str, Any]]:
    """``run.json`` of each run under ``<store>/<prefix>/`` (or of the one run ``stamp``)."""
    from .catalog import run_sync

    async def go() -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        async with open_store(store) as st:
            if stamp is not None:
                keys = [join_key(prefix, stamp, "experiment", "run.json")]
            else:
                keys = [
                    o.key
                    for o in await st.list(prefix + "/")
                    if o.key.count("/") == prefix.count("/") + 3
                    and o.key.endswith("/experiment/run.json")
                ]
            for key in keys:
                try:
                    data = json.loads(await st.get_bytes(key))
                except (NotFoundError, ValueError):
                    continue
                if isinstance(data, dict):
                    out[key[len(prefix) + 1 :].split("/", 1)[0]] = data
        return out

    return run_sync(go())


def pull_records(store: str, run: str, dest: str) -> int:
    """Copy ``<store>/<run>/experiment/`` into ``dest`` (each file via temp + rename, so the
    mirror never uploads a torn one); returns how many files."""
    from .catalog import run_sync

    prefix = join_key(run, "experiment") + "/"

    async def go() -> int:
        async with open_store(store) as st:
            objs = await st.list(prefix)
            for o in objs:
                rel = o.key[len(prefix) :]
                if any(p in ("", ".", "..") for p in rel.split("/")):
                    continue  # never write outside dest
                path = os.path.join(dest, *rel.split("/"))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = temp_name(path)
                await st.get_file(o.key, tmp, size=o.size)
                os.replace(tmp, path)
        return len(objs)

    return run_sync(go())


def newest_step(urls: list[str]) -> int | None:
    """The highest step of the committed checkpoints in any of ``urls`` (None: no checkpoint)."""
    from .catalog import list_checkpoints

    best: int | None = None
    for url in urls:
        try:
            manifests = list_checkpoints(url)
        except (CkptdError, OSError) as e:
            log.debug("no checkpoints in %s: %s", url, e)
            continue
        for m in manifests:
            step = m.get("step")
            if isinstance(step, int) and (best is None or step > best):
                best = step
    return best


def split_metrics(lines: list[str], step: int) -> tuple[list[str], list[str]]:
    """(kept, dropped): lines with a step after ``step`` are dropped, and torn lines too."""
    kept, dropped = [], []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill
        s = row.get("step") if isinstance(row, dict) else None
        (dropped if isinstance(s, int | float) and s > step else kept).append(line)
    return kept, dropped


def run_info(url: str) -> dict[str, Any]:
    """The ``run.json`` of the run at ``url`` (a store URL or a local run folder), with
    ``status`` as it stands: ``running``, ``finished``, ``failed`` or ``interrupted`` (a run
    whose writer is gone; see ``resolved_status``). The recorded value is ``recorded_status``."""
    from .catalog import run_sync

    base = run_url(url)
    if is_local(base):
        path = local_path(base)
        for folder in (os.path.join(path, "experiment"), path):  # store or base_dir layout
            record = read_json(os.path.join(folder, "run.json"))
            if record is not None:
                locked = locked_by_other(folder)
                return {**record, "recorded_status": record.get("status"),
                        "status": resolved_status(record, locked=locked)}  # fmt: skip
        raise NotFoundError(f"{base} has no experiment/run.json")

    async def go() -> bytes:
        async with open_store(base) as store:
            return await store.get_bytes(join_key("experiment", "run.json"))

    try:
        record = json.loads(run_sync(go()))
    except NotFoundError as e:
        raise NotFoundError(f"{base} has no experiment/run.json") from e
    except ValueError as e:
        raise CkptdError(f"{base}: run.json is unreadable: {e}") from e
    return {**record, "recorded_status": record.get("status"), "status": resolved_status(record)}
