"""``Experiment``: a run's folder and the records a result needs to be trusted and repeated.

One call creates ``<root>/<project>/<name>/<YYYY-MM-DD_HH-MM-SS>/experiment/`` (the local store
layout, so with the root as the store nothing needs copying) and a ``Checkpointer`` for the run
``<project>/<name>/<ts>``. It records, unasked: the resolved config (YAML and a readable tree),
git commit/branch/remote/dirty flag and the uncommitted diff, the environment, the seed it set,
the run's log records (``main.log``), metrics as they come (``metrics.jsonl``) and results.

The daemon mirrors the folder to ``<store>/<run>/experiment/`` (socket op ``mirror``): the
training process writes local files only and never touches the network.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import json
import logging
import os
import platform
import random
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from .errors import CkptdError, ConfigError, DaemonUnavailableError, NotFoundError
from .names import check_name
from .storage import is_local, join_key, local_path, open_store

log = logging.getLogger("ckptd.experiment")

RESULT_PARTS = ("results", "hyperparameters", "training_history", "predictions")
"""The parts ``save_results(separate_files=True)`` writes to a file each (others go too)."""

_PACKAGES = (
    "ckptd",
    "torch",
    "numpy",
    "safetensors",
    "omegaconf",
    "hydra-core",
    "pytorch-lightning",
    "lightning",
    "transformers",
    "accelerate",
    "datasets",
    "PyYAML",
    "watchdog",
)
_ENV_VARS = ("CUDA_VISIBLE_DEVICES", "RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_JOB_ID")
_GIT_TIMEOUT = 10.0


# ---- config ------------------------------------------------------------------------------------


def to_plain(config: Any) -> Any:
    """A dict, dataclass, OmegaConf/Hydra config or Namespace as plain YAML-able data."""
    if config is None:
        return {}
    mod = type(config).__module__
    if mod.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return _plain(OmegaConf.to_container(config, resolve=True, throw_on_missing=False))
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return _plain(dataclasses.asdict(config))
    if hasattr(config, "model_dump"):  # pydantic v2
        return _plain(config.model_dump())
    if isinstance(config, Mapping):
        return _plain(config)
    if hasattr(config, "__dict__") and type(config).__name__ == "Namespace":
        return _plain(vars(config))
    raise ConfigError(
        f"config must be a dict, a dataclass or an OmegaConf config, not {type(config).__name__}"
    )


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple | set | frozenset):
        return [_plain(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _plain(dataclasses.asdict(x))
    if isinstance(x, enum.Enum):
        return _plain(x.value)
    if x is None or isinstance(x, bool | int | float | str):
        return x
    item = getattr(x, "item", None)  # numpy and 0-d torch scalars
    if callable(item) and getattr(x, "ndim", 1) == 0:
        return item()
    tolist = getattr(x, "tolist", None)
    if callable(tolist):
        return tolist()
    return str(x)  # paths, dtypes, devices: readable, and never a pickle


def config_tree(config: Any, indent: str = "") -> str:
    """A readable tree of a plain config (what ``config_tree.txt`` holds)."""
    lines: list[str] = []

    def walk(x: Any, prefix: str) -> None:
        items = list(x.items()) if isinstance(x, dict) else list(enumerate(x))
        for i, (k, v) in enumerate(items):
            last = i == len(items) - 1
            branch, cont = ("└── ", "    ") if last else ("├── ", "│   ")
            if isinstance(v, dict | list) and v:
                lines.append(f"{prefix}{branch}{k}")
                walk(v, prefix + cont)
            else:
                lines.append(f"{prefix}{branch}{k}: {json.dumps(v)}")

    if isinstance(config, dict | list) and config:
        lines.append("config")
        walk(config, indent)
    else:
        lines.append(f"config: {json.dumps(config)}")
    return "\n".join(lines) + "\n"


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)


# ---- git and environment ----------------------------------------------------------------------


def _git(cwd: str, *args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=_GIT_TIMEOUT, check=True
    )
    return out.stdout


def git_info(cwd: str) -> tuple[dict[str, Any], str | None]:
    """``git.json`` content and the uncommitted diff (None when clean or unavailable)."""
    try:
        top = _git(cwd, "rev-parse", "--show-toplevel").strip()
    except FileNotFoundError:
        return {"available": False, "reason": "git is not installed"}, None
    except subprocess.CalledProcessError as e:
        return {"available": False, "reason": (e.stderr or "not a git repository").strip()}, None
    except (subprocess.TimeoutExpired, OSError) as e:
        return {"available": False, "reason": f"git failed: {e}"}, None
    info: dict[str, Any] = {"available": True, "root": top}

    def opt(*args: str) -> str | None:
        try:
            return _git(top, *args).strip() or None
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
            return None

    info["commit"] = opt("rev-parse", "HEAD")  # None in a repo without commits
    branch = opt("rev-parse", "--abbrev-ref", "HEAD")
    info["branch"] = None if branch == "HEAD" else branch  # detached HEAD has no branch
    remotes = (opt("remote") or "").split()
    remote = "origin" if "origin" in remotes else (remotes[0] if remotes else None)
    info["remote"] = opt("remote", "get-url", remote) if remote else None
    status = opt("status", "--porcelain", "--untracked-files=no") or ""
    info["dirty"] = bool(status)
    untracked = opt("ls-files", "--others", "--exclude-standard") or ""
    info["untracked_files"] = len(untracked.splitlines())
    diff = opt("diff", "HEAD", "--binary") if info["commit"] else opt("diff", "--cached")
    info["diff_file"] = "git.diff" if diff else None
    return info, (diff + "\n") if diff else None


def env_info(seed: int | None) -> dict[str, Any]:
    """What ran the experiment: interpreter, torch and CUDA, package versions, host, command."""
    import torch

    versions: dict[str, str] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    cuda: dict[str, Any] = {"available": torch.cuda.is_available(), "version": torch.version.cuda}
    if cuda["available"]:
        cuda["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        cuda["cudnn"] = torch.backends.cudnn.version()
    return {
        "python": sys.version,
        "executable": sys.executable,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "argv": list(sys.argv),
        "torch": torch.__version__,
        "cuda": cuda,
        "packages": versions,
        "env": {k: os.environ[k] for k in _ENV_VARS if k in os.environ},
        "seed": seed,
    }


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all CUDA devices too)."""
    import torch

    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    torch.manual_seed(seed)


# ---- files -------------------------------------------------------------------------------------


def _atomic_write(path: str, text: str) -> None:
    """Temp file + rename: the mirror sees a complete file (the rename), never a torn one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json(data: Any) -> str:
    return json.dumps(_plain(data), indent=1, allow_nan=True) + "\n"


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
        connect: False for records only, without a daemon (no checkpointer, no mirroring).
        capture_logs: attach a FileHandler (``main.log``) to the root logger until ``finish``.
        git_dir: the repository to describe; default the current directory.
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
        connect: bool = True,
        capture_logs: bool = True,
        log_level: int = logging.INFO,
        git_dir: str | None = None,
        **checkpointer_kwargs: Any,
    ) -> None:
        check_name(project, "run")
        check_name(name, "run")
        auto_ts = timestamp is None
        ts = timestamp or _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        self.project, self.name = project, name
        self._store_url = store
        self._ckpt: Any = None
        self.mirroring = False
        self._finished = False
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
        self.dir, ts = self._make_dir(os.path.abspath(root), project, name, ts, auto_ts, base_dir)
        self.run = f"{project}/{name}/{ts}"
        if self._ckpt is not None and self._ckpt.run != self.run:  # the timestamp was taken
            self._ckpt.close()
            self._ckpt = Checkpointer(self.run, store=store, socket=socket, **checkpointer_kwargs)

        self.seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
        seed_everything(self.seed)
        self.config = to_plain(config)
        self._write("config_resolved.yaml", _yaml(self.config))
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
        self._write_run("running")

        self._update = 0
        self._metrics = open(  # noqa: SIM115 - open for the whole run, closed by finish()
            os.path.join(self.dir, "metrics.jsonl"), "a", buffering=1, encoding="utf-8"
        )
        self._log_handlers: list[logging.Handler] = []
        self._root_level: int | None = None
        if capture_logs:
            self._capture_logs(log_level)
        if self._ckpt is not None:
            self._mirror("start")
        log.info("experiment %s in %s (seed %d)", self.run, self.dir, self.seed)

    @staticmethod
    def _make_dir(
        root: str, project: str, name: str, ts: str, auto_ts: bool, base_dir: str | None
    ) -> tuple[str, str]:
        """Create the folder; a second run in the same second gets ``<ts>-1``, ``<ts>-2``..."""
        suffix = "" if base_dir is not None else "experiment"
        for n in range(1000):
            stamp = ts if n == 0 else f"{ts}-{n}"
            check_name(stamp, "run")
            path = os.path.join(root, project, name, stamp, suffix).rstrip(os.sep)
            try:
                os.makedirs(path, exist_ok=not auto_ts)
                return path, stamp
            except FileExistsError:
                continue
        raise ConfigError(f"cannot create an experiment folder under {root}/{project}/{name}")

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
        record = {
            "run": self.run,
            "project": self.project,
            "name": self.name,
            "seed": self.seed,
            "status": status,
            "started": _dt.datetime.fromtimestamp(self._started, _dt.UTC).isoformat(),
            "git_commit": self.git.get("commit"),
            "store": self._store_url
            or (self._ckpt.daemon_info.get("store") if self._ckpt else None),
        }
        if status != "running":
            record["finished"] = _dt.datetime.now(_dt.UTC).isoformat()
        self._write("run.json", _json(record))

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

    def _mirror(self, action: str, timeout: float | None = None) -> dict[str, Any] | None:
        """Ask the daemon to mirror/flush/stop this folder. The request and its answer:

        ``{"op": "mirror", "run", "dir", "store", "action": "start"|"flush"|"stop", "timeout"}``
        -> ``{"ev": "mirror", "ok", "active", "pending", "failed"}`` (or ``{"ev": "error"}``).
        """
        assert self._ckpt is not None
        if self._in_store():
            return {"ok": True, "active": False, "pending": []}
        if "mirror" not in self._ckpt.daemon_info.get("features", ()):
            if action == "start":
                log.warning(
                    "the daemon at %s does not mirror experiment folders; %s stays local",
                    self._ckpt.socket_path,
                    self.dir,
                )
            return None
        msg = {
            "op": "mirror",
            "run": self.run,
            "dir": self.dir,
            "store": self._store_url,
            "action": action,
            "timeout": timeout,
        }
        try:
            reply = _request(self._ckpt._ensure_connected(), msg)
        except DaemonUnavailableError as e:
            log.warning("cannot reach the daemon to mirror %s: %s", self.dir, e)
            return None
        if reply.get("ev") != "mirror":
            log.warning("the daemon refused to mirror %s: %s", self.dir, reply.get("error", reply))
            return None
        self.mirroring = bool(reply.get("active"))
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
        return bool(reply and reply.get("ok"))

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
        ok = False
        if self._ckpt is not None:
            try:
                reply = self._mirror("stop", timeout)
                ok = bool(reply and reply.get("ok"))
                if reply is not None and not ok:
                    log.warning("records not all in the store yet: %s", reply.get("pending"))
            finally:
                self._ckpt.close()  # returns once the daemon holds every checkpoint saved
        return ok

    def __enter__(self) -> Experiment:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            log.error("run failed", exc_info=(exc_type, exc, tb))
        self.finish("failed" if exc is not None else "finished")


def _request(conn: Any, msg: dict[str, Any]) -> dict[str, Any]:
    """``conn.request`` without a fixed deadline, that gives up when the connection dies (a
    flush may rightly take long; a dead daemon must not hang ``finish``)."""
    import queue

    rid = next(conn._rids)
    q: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=1)
    conn._replies[rid] = q
    try:
        conn.send({**msg, "rid": rid})
        while True:
            try:
                return q.get(timeout=0.2)
            except queue.Empty:
                if not conn.alive:
                    if not q.empty():  # answered, then went away
                        return q.get_nowait()
                    raise DaemonUnavailableError(
                        "the daemon went away during a mirror request"
                    ) from None
    finally:
        conn._replies.pop(rid, None)


# ---- reading records back ----------------------------------------------------------------------


def _run_url(url: str) -> str:
    from .catalog import _normalize, split_tag

    base, _ = _normalize(split_tag(url)[0])
    return base


def list_records(url: str) -> list[tuple[str, int]]:
    """The experiment records of the run at ``url``: (key under ``experiment/``, size)."""
    from .catalog import run_sync

    base = _run_url(url)

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

    base = _run_url(url)

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


__all__ = ["Experiment", "list_records", "load_config", "seed_everything", "to_plain"]
