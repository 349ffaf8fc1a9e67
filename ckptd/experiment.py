"""``Experiment``: a run's folder and the records a result needs to be trusted and repeated.

One call creates ``<root>/<project>/<name>/<YYYY-MM-DD_HH-MM-SS>/experiment/`` (the local store
layout, so with the root as the store nothing needs copying) and a ``Checkpointer`` for the run
``<project>/<name>/<ts>``. It records, unasked: the resolved config (YAML and a readable tree),
git commit/branch/remote/dirty flag and the uncommitted diff, the environment, the seed it set,
the run's log records (``main.log``), metrics as they come (``metrics.jsonl``) and results.

The daemon mirrors the folder to ``<store>/<run>/experiment/`` (socket op ``mirror``): the
training process writes local files only and never touches the network, except once at start to
find and pull back the run it continues.

A rerun of the same command continues the newest run of its project/name that did not finish
(``resume="auto"``), so a job killed on a lost machine carries on under the same run id: the
records are pulled from the store, appended to, and the metrics that earlier attempts logged after
the restored checkpoint are replaced, never duplicated. A folder lock (``flock``, dropped by the
kernel when its process dies) and the writer's host, pid and process start time in ``run.json``
tell a killed run from a live one, which is never taken over.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from .atomic import write_atomic
from .errors import CkptdError, ConfigError, DaemonUnavailableError, NotFoundError, ProtocolError
from .names import check_name
from .protocol import MirrorReport, MirrorRequest
from .records import (
    config_tree,
    env_info,
    git_info,
    plain,
    seed_everything,
    to_plain,
    to_yaml,
)
from .runs import (
    HEARTBEAT_S,
    STALE_S,
    SUPERSEDED,
    FoundRun,
    Resume,
    iso_age,
    lock_folder,
    newest_step,
    process_identity,
    pull_records,
    read_json,
    resolved_status,
    run_info,
    run_url,
    split_metrics,
    store_records,
    store_run_url,
    valid_stamp,
    writer_alive,
)
from .storage import is_local, join_key, local_path, open_store

log = logging.getLogger("ckptd.experiment")

RESULT_PARTS = ("results", "hyperparameters", "training_history", "predictions")
"""The parts ``save_results(separate_files=True)`` writes to a file each (others go too)."""

# ---- files -------------------------------------------------------------------------------------


def _atomic_write(path: str, text: str) -> None:
    """Temp file + rename (``ckptd.atomic``): the mirror sees a complete file, never a torn one,
    and skips the temporary name."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, text.encode("utf-8"))


def _json(data: Any) -> str:
    return json.dumps(plain(data), indent=1, allow_nan=True) + "\n"


def _scalar(value: Any) -> Any:
    """Python number from a number, a one-element tensor or a numpy scalar."""
    if isinstance(value, bool | int | float):
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()  # on CUDA this synchronizes: log what you already need on the host
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"metric value must be a scalar, got {value!r}") from e
    raise ConfigError(f"metric value must be a number or a scalar tensor, not {type(value)}")


# ---- the experiment ----------------------------------------------------------------------------


class Experiment:
    """The run's experiment folder, its records, and a ``Checkpointer`` bound to it.

    Args:
        project, name: the run is ``<project>/<name>/<timestamp>``.
        config: dict, dataclass or OmegaConf/Hydra config; saved resolved.
        seed: seeds python/numpy/torch; None draws one (recorded either way, as ``exp.seed``).
        base_dir: where the folder goes: ``<base_dir>/<run>/``. Default: the daemon's root, as
            ``<root>/<run>/experiment/`` (the store layout).
        store, socket: as for ``Checkpointer``.
        timestamp: the run's last part; default now (local time). Give the same on every rank.
            A given timestamp names the run: an earlier attempt of it is continued.
        resume: ``"auto"`` (default): rerunning the same command continues the newest run of
            this project/name (in the folder's root or the daemon's store) that is not
            ``finished`` and whose writer is gone, so that a run killed on a lost machine
            carries on. ``"never"``: always a new run. A run id (``<timestamp>`` or
            ``<project>/<name>/<timestamp>``): continue that run. Anything else is a
            ``ConfigError``. A continued run keeps its id and folder (pulled from the store on a
            fresh machine), appends to its records, and ``exp.resumed`` is True. With a
            checkpointer, metrics lines of earlier attempts with a step after the newest
            checkpoint's are dropped now, and after the step that ``exp.restore()`` or
            ``exp.checkpointer.restore()`` returns (see ``rewind``): log an update's metrics with
            the step you pass to ``save()``, and restore before logging. In DDP, give every rank
            the same ``timestamp`` (or run id).
        connect: False for records only, without a daemon (no checkpointer, no mirroring).
        capture_logs: attach a FileHandler (``main.log``) to the root logger until ``finish``.
        git_dir: the repository to describe; default the current directory.

    ``run.json`` says ``status`` (``running``, ``finished``, ``failed``; ``run_info()`` reads a
    ``running`` run whose process is gone as ``interrupted``), the writer's host and pid, a
    heartbeat, and the earlier ``attempts`` with how each ended.
    """

    def __init__(
        self,
        project: str,
        name: str,
        *,
        config: Any = None,
        seed: int | None = 0,
        base_dir: str | None = None,
        store: str | None = None,
        socket: str | None = None,
        timestamp: str | None = None,
        resume: str | Resume = Resume.AUTO,
        connect: bool = True,
        capture_logs: bool = True,
        log_level: int = logging.INFO,
        git_dir: str | None = None,
        **checkpointer_kwargs: Any,
    ) -> None:
        check_name(project, "run")
        check_name(name, "run")
        mode, wanted = self._resume_mode(resume, project, name)
        if timestamp is not None:
            check_name(timestamp, "run")
            if wanted is not None and wanted != timestamp:
                raise ConfigError(f"timestamp={timestamp!r} and resume={resume!r} disagree")
            wanted = timestamp
        ts = wanted or _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        self.project, self.name = project, name
        self._store_url = store
        self._ckpt: Any = None
        self.mirroring = False
        self._finished = False
        self._lock_fd: int | None = None
        self.resumed = False
        """True when this continues an earlier run (same id, same folder, records appended)."""
        self.previous_status: str | None = None
        """How the earlier attempt of a continued run ended (``interrupted``, ``failed``...)."""
        if connect:
            from .client import Checkpointer

            # Connect first: the default folder is under the daemon's root.
            self._ckpt = Checkpointer(
                f"{project}/{name}/{ts}", store=store, socket=socket, **checkpointer_kwargs
            )
        root = base_dir
        if root is None:
            from .defaults import default_root

            root = self._ckpt.daemon_info.get("root") if self._ckpt else default_root()
        self._root = os.path.abspath(root)
        self._layout_suffix = "" if base_dir is not None else "experiment"
        try:
            previous = self._open_folder(mode, ts, explicit=wanted is not None, by_id=resume)
            self.run = f"{project}/{name}/{self._stamp}"
            if self._ckpt is not None and self._ckpt.run != self.run:  # another run was chosen
                self._ckpt.close()
                self._ckpt = None
                self._ckpt = Checkpointer(
                    self.run, store=store, socket=socket, **checkpointer_kwargs
                )
            if self._ckpt is not None:
                self._wrap_restore()
            self._start(config, seed, git_dir, previous, capture_logs, log_level)
        except BaseException:  # leave no lock held and no connection open
            self._abandon()
            raise

    def _start(
        self,
        config: Any,
        seed: int | None,
        git_dir: str | None,
        previous: dict[str, Any] | None,
        capture_logs: bool,
        log_level: int,
    ) -> None:
        """Write the records of this attempt and open the appended ones."""
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
        seed_everything(self.seed)
        self.config = to_plain(config)
        if self.resumed:
            self._warn_if_config_changed()
        self._write("config_resolved.yaml", to_yaml(self.config))
        self._write("config_tree.txt", config_tree(self.config))
        git, diff = git_info(git_dir or os.getcwd())
        self.git = git
        self._write("git.json", _json(git))
        if diff is not None:
            self._write("git.diff", diff)
        if self._ckpt is not None and git.get("commit"):
            self._ckpt.git_commit = git["commit"]  # recorded in manifests (client hook)
        self._write("env.json", _json(env_info(self.seed)))
        self._started = time.time()
        self._beat = 0.0
        self._first_started = previous.get("started") if previous else None
        self._history = self._attempts(previous)
        self._write_run("running")

        self._update = 0
        metrics = os.path.join(self.dir, "metrics.jsonl")
        # metrics.jsonl's bytes before this offset are earlier attempts' (rewind's to drop).
        self._own_from = os.path.getsize(metrics) if os.path.exists(metrics) else 0
        if self.resumed and self._ckpt is not None:
            step = newest_step(self._checkpoint_urls())
            self.rewind(-1 if step is None else step)
        self._metrics = open(  # noqa: SIM115 - open for the whole run, closed by finish()
            metrics, "a", buffering=1, encoding="utf-8"
        )
        self._log_handlers: list[logging.Handler] = []
        self._root_level: int | None = None
        if capture_logs:
            self._capture_logs(log_level)
        if self._ckpt is not None:
            self._mirror("start")
        if self.resumed:
            log.info("experiment %s resumed in %s (it was %s; seed %d)", self.run, self.dir,
                     self.previous_status, self.seed)  # fmt: skip
        else:
            log.info("experiment %s in %s (seed %d)", self.run, self.dir, self.seed)

    def _abandon(self) -> None:
        for h in getattr(self, "_log_handlers", []):
            logging.getLogger().removeHandler(h)
            h.close()
        metrics = getattr(self, "_metrics", None)
        if metrics is not None:
            metrics.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._ckpt is not None:
            self._ckpt.close()

    # ---- choosing the run --------------------------------------------------------------------

    @staticmethod
    def _resume_mode(resume: Any, project: str, name: str) -> tuple[Resume | None, str | None]:
        """(mode, the timestamp asked for): ``auto``/``never``, or a run id to continue."""
        if isinstance(resume, Resume):
            return resume, None
        if not isinstance(resume, str) or not resume:
            raise ConfigError(f"resume must be 'auto', 'never' or a run id, not {resume!r}")
        try:
            return Resume(resume), None
        except ValueError:
            pass
        try:
            check_name(resume, "run")
        except ConfigError:
            raise ConfigError(
                f"resume must be 'auto', 'never' or a run id, not {resume!r}"
            ) from None
        parts = resume.split("/")
        if len(parts) == 3 and parts[:2] == [project, name]:
            return None, parts[2]
        if len(parts) == 1:
            return None, resume
        raise ConfigError(
            f"resume={resume!r} is neither 'auto', 'never', a timestamp nor a run of "
            f"{project}/{name}"
        )

    def _folder(self, stamp: str) -> str:
        return os.path.join(self._root, self.project, self.name, stamp, self._layout_suffix).rstrip(
            os.sep
        )

    def _store(self) -> str | None:
        """The run's store (``store=`` or the daemon's, from its welcome), None without one."""
        if self._store_url:
            return self._store_url
        return self._ckpt.daemon_info.get("store") if self._ckpt is not None else None

    def _remote_store(self) -> str | None:
        """The store, unless it is the folder's own root (then the local scan sees it all)."""
        store = self._store()
        if not store:
            return None
        if is_local(store) and not self._layout_suffix:
            return store  # base_dir layout: the store's copy is elsewhere
        if is_local(store) and os.path.realpath(local_path(store)) == os.path.realpath(self._root):
            return None
        return store

    def _earlier_runs(self, stamp: str | None) -> list[FoundRun]:
        """Earlier runs of this project/name (or the one ``stamp``), newest first."""
        found: dict[str, FoundRun] = {}
        store = self._remote_store()
        if store:
            try:
                records = store_records(store, f"{self.project}/{self.name}", stamp)
            except CkptdError as e:
                log.warning("cannot look for earlier runs in %s: %s", store, e)
                records = {}
            for s, rec in records.items():
                found[s] = FoundRun(s, rec, local=False)
        base = os.path.join(self._root, self.project, self.name)
        stamps = [stamp] if stamp is not None else (os.listdir(base) if os.path.isdir(base) else [])
        for s in filter(valid_stamp, stamps):
            rec = read_json(os.path.join(self._folder(s), "run.json"))
            if rec is not None:
                found[s] = FoundRun(s, rec, local=True)  # this disk's copy is the freshest
        runs = [f for f in found.values() if valid_stamp(f.stamp)]
        return sorted(runs, key=lambda f: (str(f.record.get("started", "")), f.stamp), reverse=True)

    def _open_folder(
        self, mode: Resume | None, ts: str, *, explicit: bool, by_id: Any
    ) -> dict[str, Any] | None:
        """Pick the run (continued or new), create and lock its folder; returns the earlier
        attempt's record when the run is continued."""
        if explicit:  # the run is named: continue it if it has records, shared with other ranks
            (found,) = self._earlier_runs(ts) or (None,)
            if found is None and mode is None:
                raise ConfigError(
                    f"resume={by_id!r} is neither 'auto', 'never' nor a run of "
                    f"{self.project}/{self.name} (none named {ts} here or in the store)"
                )
            self.dir, self._stamp = self._folder(ts), ts
            os.makedirs(self.dir, exist_ok=True)
            self._lock_fd = lock_folder(self.dir, exclusive=False)
            if self._lock_fd is None:
                raise ConfigError(f"run {self.project}/{self.name}/{ts} is being continued by "
                                  "another process on this host")  # fmt: skip
            live = found is not None and found.record.get("status") == "running"
            if found is None or mode is Resume.NEVER or (live and writer_alive(found.record)):
                return None  # new, not to be continued, or another rank writes it now: join it
            return self._continue(found)
        if mode is Resume.AUTO:
            for found in self._earlier_runs(None):
                if found.record.get("status") == "finished":
                    continue
                if found.record.get("status") == "running" and writer_alive(found.record):
                    continue  # one writer per run
                folder = self._folder(found.stamp)
                os.makedirs(folder, exist_ok=True)
                fd = lock_folder(folder, exclusive=True)
                if fd is None:
                    continue  # another process on this host writes it
                self._lock_fd, self.dir, self._stamp = fd, folder, found.stamp
                return self._continue(found)
        self.dir, self._stamp = self._make_dir(self._root, self.project, self.name, ts,
                                               self._layout_suffix)  # fmt: skip
        self._lock_fd = lock_folder(self.dir, exclusive=True)
        return None

    def _continue(self, found: FoundRun) -> dict[str, Any]:
        """Make the folder hold the run's records (pulled from the store on a fresh machine)."""
        record = found.record
        if not found.local:
            store = self._remote_store()
            assert store is not None
            n = pull_records(store, f"{self.project}/{self.name}/{found.stamp}", self.dir)
            log.info("pulled %d records of %s from %s", n, found.stamp, store)
            record = read_json(os.path.join(self.dir, "run.json")) or record
        status = resolved_status(record)
        if status == "running":  # on another host, by definition no longer
            status = "interrupted"
            age = iso_age(record.get("heartbeat"))
            if age is not None and age < STALE_S:
                log.warning("run %s/%s/%s was alive on %s %.0f s ago; continuing it here "
                            "(resume='never' starts a new run instead)", self.project, self.name,
                            found.stamp, record.get("host"), age)  # fmt: skip
        self.resumed, self.previous_status = True, status
        return {**record, "status": status}

    def _attempts(self, previous: dict[str, Any] | None) -> list[dict[str, Any]]:
        if previous is None:
            return []
        ended = previous.get("finished") or previous.get("heartbeat")
        last = {k: previous.get(k) for k in ("host", "pid")}
        last.update(started=previous.get("attempt_started") or previous.get("started"),
                    ended=ended, status=previous.get("status"))  # fmt: skip
        return [*previous.get("attempts", []), last]

    def _warn_if_config_changed(self) -> None:
        import yaml

        try:
            with open(self.path("config_resolved.yaml"), encoding="utf-8") as f:
                before = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            return
        if (before or {}) != self.config:
            log.warning("run %s continues with a config other than it started with; "
                        "config_resolved.yaml now holds the new one", self.run)  # fmt: skip

    def _checkpoint_urls(self) -> list[str]:
        urls = [os.path.join(self._ckpt.daemon_info.get("root") or "", self.run)]
        if store := self._store():
            urls.append(store_run_url(store, self.run))
        return urls

    @staticmethod
    def _make_dir(root: str, project: str, name: str, ts: str, suffix: str) -> tuple[str, str]:
        """Create a new folder; a second run in the same second gets ``<ts>-1``, ``<ts>-2``..."""
        for n in range(1000):
            stamp = ts if n == 0 else f"{ts}-{n}"
            check_name(stamp, "run")
            path = os.path.join(root, project, name, stamp, suffix).rstrip(os.sep)
            try:
                os.makedirs(path)
                return path, stamp
            except FileExistsError:
                continue
        raise ConfigError(f"cannot create an experiment folder under {root}/{project}/{name}")

    # ---- restoring ---------------------------------------------------------------------------

    def _wrap_restore(self) -> None:
        """``exp.checkpointer.restore`` rewinds the metrics too, so either call keeps each step
        once in ``metrics.jsonl``."""
        import functools

        inner = self._ckpt.restore

        @functools.wraps(inner)
        def restore(*args: Any, **kwargs: Any) -> dict[str, Any] | None:
            return self._restored(inner(*args, **kwargs))

        self._ckpt.restore = restore

    def restore(
        self, model: Any = None, optimizer: Any = None, **kwargs: Any
    ) -> dict[str, Any] | None:
        """``checkpointer.restore(...)`` (same arguments, same meta or None), then ``rewind`` to
        the restored step. The meta carries ``step``, ``epoch``, ``sample`` and ``metrics`` (the
        last value of each metric logged up to that step)."""
        return self.checkpointer.restore(model, optimizer, **kwargs)

    def _restored(self, meta: dict[str, Any] | None) -> dict[str, Any] | None:
        step = meta.get("step") if meta is not None else None
        step = int(step) if isinstance(step, int | float) else -1
        self.rewind(step)
        self._update = step + 1
        if meta is None:
            return None
        progress = meta.get("training_iteration") or {}
        meta.setdefault("epoch", progress.get("epoch"))
        meta.setdefault("sample", progress.get("sample"))
        meta.setdefault("metrics", self._metrics_at(step))
        return meta

    def rewind(self, step: int) -> int:
        """Drop the metrics lines of earlier attempts with a step after ``step`` (the step the run
        continues from; -1 drops them all); returns how many. They move to
        ``metrics.superseded.jsonl``, and the lines this attempt logged stay."""
        path = os.path.join(self.dir, "metrics.jsonl")
        handle = getattr(self, "_metrics", None)
        if handle is not None and not handle.closed:
            handle.flush()
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return 0
        old = data[: self._own_from].decode("utf-8", errors="replace").splitlines(keepends=True)
        kept, dropped = split_metrics(old, step)
        if not dropped and len(kept) == len(old):
            return 0
        if dropped:
            with open(self.path(SUPERSEDED), "a", encoding="utf-8") as f:
                f.writelines(line if line.endswith("\n") else line + "\n" for line in dropped)
        kept = [line if line.endswith("\n") else line + "\n" for line in kept]
        head = "".join(kept)
        self._write("metrics.jsonl", head + data[self._own_from :].decode("utf-8", "replace"))
        self._own_from = len(head.encode("utf-8"))
        if handle is not None and not handle.closed:  # the old handle writes to the old inode
            handle.close()
            self._metrics = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        if dropped:
            log.info("metrics after step %d of earlier attempts replaced (%d lines)", step,
                     len(dropped))  # fmt: skip
        return len(dropped)

    def _metrics_at(self, step: int) -> dict[str, Any]:
        """The last value of each metric logged at or before ``step``."""
        out: dict[str, tuple[float, Any]] = {}
        try:
            with open(os.path.join(self.dir, "metrics.jsonl"), encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue
                    s = row.get("step") if isinstance(row, dict) else None
                    if not isinstance(s, int | float) or s > step or "key" not in row:
                        continue
                    if row["key"] not in out or s >= out[row["key"]][0]:
                        out[row["key"]] = (s, row.get("value"))
        except FileNotFoundError:
            return {}
        return {k: v for k, (_, v) in out.items()}

    # ---- records -----------------------------------------------------------------------------

    @property
    def checkpointer(self) -> Any:
        """The run's ``Checkpointer``: checkpoints go to ``<store>/<run>/checkpoints/``."""
        if self._ckpt is None:
            raise ConfigError("this Experiment was made with connect=False: no checkpointer")
        return self._ckpt

    def path(self, *parts: str) -> str:
        """A path inside the experiment folder (files written there are mirrored)."""
        return os.path.join(self.dir, *parts)

    def _write(self, rel: str, text: str) -> None:
        _atomic_write(os.path.join(self.dir, rel), text)

    def _write_run(self, status: str) -> None:
        """``run.json``: what the run is, who writes it (host, pid, process identity: how a
        later look tells a killed run from a live one) and how earlier attempts ended."""
        now = time.time()
        started = _dt.datetime.fromtimestamp(self._started, _dt.UTC).isoformat()
        record = {
            "run": self.run,
            "project": self.project,
            "name": self.name,
            "seed": self.seed,
            "status": status,
            "started": self._first_started or started,
            "attempt": len(self._history) + 1,
            "attempt_started": started,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process": process_identity(os.getpid()),
            "heartbeat": _dt.datetime.fromtimestamp(now, _dt.UTC).isoformat(),
            "git_commit": self.git.get("commit"),
            "store": self._store(),
            "attempts": self._history,
        }
        if status != "running":
            record["finished"] = record["heartbeat"]
        self._write("run.json", _json(record))
        self._beat = now

    def _capture_logs(self, level: int) -> None:
        root = logging.getLogger()
        handler = logging.FileHandler(os.path.join(self.dir, "main.log"), encoding="utf-8")
        handler.setLevel(level)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s")
        )
        if not root.handlers:
            # Our handler would silence logging's last-resort stderr output; keep it visible.
            console = logging.StreamHandler()
            console.setLevel(logging.WARNING)
            self._log_handlers.append(console)
            root.addHandler(console)
        self._log_handlers.append(handler)
        root.addHandler(handler)
        if root.level > level or root.level == logging.NOTSET:
            self._root_level = root.level
            root.setLevel(level)

    def _release_logs(self) -> None:
        root = logging.getLogger()
        for h in self._log_handlers:
            root.removeHandler(h)
            h.close()
        self._log_handlers.clear()
        if self._root_level is not None:
            root.setLevel(self._root_level)
            self._root_level = None

    # ---- metrics -----------------------------------------------------------------------------

    def log_scalar(self, key: str, value: Any, step: int | None = None) -> None:
        """Append one metric line now (line-buffered: a crash keeps every line logged so far).

        ``step`` defaults to the current update (the number of ``flush()`` calls so far).
        """
        if self._metrics.closed:
            raise ConfigError("log_scalar() after finish()")
        line = {
            "step": self._update if step is None else int(step),
            "key": str(key),
            "value": _scalar(value),
            "time": round(time.time(), 6),
        }
        self._metrics.write(json.dumps(line, allow_nan=True) + "\n")

    def log_scalars(self, values: Mapping[str, Any], step: int | None = None) -> None:
        for k, v in values.items():
            self.log_scalar(k, v, step)

    def flush(self) -> None:
        """End the current update: flush the metrics to the OS and advance the default step."""
        if not self._metrics.closed:
            self._metrics.flush()
            if time.time() - self._beat >= HEARTBEAT_S:
                self._write_run("running")
        self._update += 1

    # ---- results -----------------------------------------------------------------------------

    def save_results(self, results: Mapping[str, Any], separate_files: bool = False) -> list[str]:
        """Write ``results/results.json``, or one file per top-level part
        (``results``, ``hyperparameters``, ``training_history``, ``predictions``, ...).
        Returns the paths written."""
        if not isinstance(results, Mapping):
            raise ConfigError(f"results must be a dict, not {type(results).__name__}")
        out = []
        if separate_files:
            for part, value in results.items():
                check_name(str(part), "result part")
                rel = os.path.join("results", f"{part}.json")
                self._write(rel, _json(value))
                out.append(self.path(rel))
        else:
            self._write(os.path.join("results", "results.json"), _json(results))
            out.append(self.path("results", "results.json"))
        return out

    def save_experiment(
        self,
        *,
        model: Any = None,
        optimizer: Any = None,
        results: Mapping[str, Any] | None = None,
        step: int | None = None,
        extra: Any = None,
        separate_files: bool = False,
        wait: str | None = "committed",
    ) -> Any:
        """Save the final model (tag ``final``) and the results in one call; returns the handle."""
        handle = None
        if model is not None or optimizer is not None or extra is not None:
            handle = self.checkpointer.save(
                self._update if step is None else step,
                model=model,
                optimizer=optimizer,
                extra=extra,
                tag="final",
            )
        if results is not None:
            self.save_results(results, separate_files=separate_files)
        if handle is not None and wait:
            handle.wait(wait)
        return handle

    # ---- mirroring and the end ---------------------------------------------------------------

    def _mirror(self, action: str, timeout: float | None = None) -> MirrorReport | None:
        """Ask the daemon to mirror/flush/stop this folder (``MirrorRequest`` -> ``MirrorReport``);
        None when it cannot or will not. Waits as long as the daemon takes, but not past the end
        of the connection (a flush may rightly take long; a dead daemon must not hang ``finish``).
        """
        assert self._ckpt is not None
        if self._in_store():
            return MirrorReport(ok=True, active=False, pending=[])
        if "mirror" not in self._ckpt.daemon_info.get("features", ()):
            if action == "start":
                log.warning(
                    "the daemon at %s does not mirror experiment folders; %s stays local",
                    self._ckpt.socket_path,
                    self.dir,
                )
            return None
        msg = MirrorRequest(
            run=self.run, dir=self.dir, store=self._store_url, action=action, timeout=timeout
        )
        try:
            reply = self._ckpt.request(msg, timeout=None)
        except (DaemonUnavailableError, ProtocolError) as e:
            log.warning("cannot reach the daemon to mirror %s: %s", self.dir, e)
            return None
        if not isinstance(reply, MirrorReport):
            log.warning(
                "the daemon refused to mirror %s: %s", self.dir, getattr(reply, "error", reply)
            )
            return None
        self.mirroring = reply.active
        return reply

    def _in_store(self) -> bool:
        """True when the folder already is ``<store>/<run>/experiment`` (a local store)."""
        assert self._ckpt is not None
        url = self._store_url or self._ckpt.daemon_info.get("store")
        url = url or self._ckpt.daemon_info.get("root")
        if not url or not is_local(url):
            return False
        target = os.path.join(local_path(url), self.run, "experiment")
        return os.path.realpath(target) == os.path.realpath(self.dir)

    def sync(self, timeout: float | None = None) -> bool:
        """Push the records to the store now; True when all are there. ``timeout=0``: don't wait."""
        if not self._metrics.closed:
            self._metrics.flush()
        if self._ckpt is None:
            return False
        reply = self._mirror("flush", timeout)
        return reply is not None and reply.ok

    def finish(self, status: str = "finished", timeout: float | None = 60.0) -> bool:
        """Close the records, push them to the store, close the checkpointer. Idempotent.

        Returns True when every record reached the store (or the folder already lies in it).
        """
        if self._finished:
            return True
        self._finished = True
        self._metrics.flush()
        os.fsync(self._metrics.fileno())
        self._metrics.close()
        self._release_logs()
        self._write_run(status)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        ok = False
        if self._ckpt is not None:
            try:
                reply = self._mirror("stop", timeout)
                ok = reply is not None and reply.ok
                if reply is not None and not ok:
                    log.warning("records not all in the store yet: %s", reply.pending)
            finally:
                self._ckpt.close()  # returns once the daemon holds every checkpoint saved
        return ok

    def __enter__(self) -> Experiment:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            log.error("run failed", exc_info=(exc_type, exc, tb))
        self.finish("failed" if exc is not None else "finished")


# ---- reading records back ----------------------------------------------------------------------


def list_records(url: str) -> list[tuple[str, int]]:
    """The experiment records of the run at ``url``: (key under ``experiment/``, size)."""
    from .catalog import run_sync

    base = run_url(url)

    async def go() -> list[tuple[str, int]]:
        async with open_store(base) as store:
            objs = await store.list("experiment/")
        return [(o.key[len("experiment/") :], o.size) for o in objs]

    return run_sync(go())


def load_config(url: str) -> dict[str, Any]:
    """The resolved config of the run at ``url`` (any store URL, ``@tag`` and checkpoint
    directories accepted): ``<run>/experiment/config_resolved.yaml`` as a dict."""
    import yaml

    from .catalog import run_sync

    base = run_url(url)

    async def go() -> bytes:
        async with open_store(base) as store:
            return await store.get_bytes(join_key("experiment", "config_resolved.yaml"))

    try:
        raw = run_sync(go())
    except NotFoundError as e:
        raise NotFoundError(f"{base} has no experiment/config_resolved.yaml") from e
    data = yaml.safe_load(raw.decode("utf-8"))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CkptdError(f"{base}: config_resolved.yaml is not a mapping")
    return data


__all__ = [
    "Experiment",
    "Resume",
    "list_records",
    "load_config",
    "resolved_status",
    "run_info",
    "seed_everything",
    "to_plain",
]
