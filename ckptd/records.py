"""What an experiment records about itself: the resolved config, git state and environment.

Plain functions with no state, so a result can be traced back to its config, commit and
environment a month later: ``to_plain`` turns a dict, dataclass or OmegaConf config into plain
data, ``config_tree`` draws it, ``git_info`` reads commit, branch, remote, dirty flag and diff,
``env_info`` the Python, packages and devices, ``seed_everything`` seeds every RNG it knows.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import platform
import random
import socket
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from .errors import ConfigError

PACKAGES = (
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
ENV_VARS = ("CUDA_VISIBLE_DEVICES", "RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_JOB_ID")
GIT_TIMEOUT = 10.0


# ---- config ------------------------------------------------------------------------------------


def to_plain(config: Any) -> Any:
    """A dict, dataclass, OmegaConf/Hydra config or Namespace as plain YAML-able data."""
    if config is None:
        return {}
    mod = type(config).__module__
    if mod.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return plain(OmegaConf.to_container(config, resolve=True, throw_on_missing=False))
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return plain(dataclasses.asdict(config))
    if hasattr(config, "model_dump"):  # pydantic v2
        return plain(config.model_dump())
    if isinstance(config, Mapping):
        return plain(config)
    if hasattr(config, "__dict__") and type(config).__name__ == "Namespace":
        return plain(vars(config))
    raise ConfigError(
        f"config must be a dict, a dataclass or an OmegaConf config, not {type(config).__name__}"
    )


def plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple | set | frozenset):
        return [plain(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return plain(dataclasses.asdict(x))
    if isinstance(x, enum.Enum):
        return plain(x.value)
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


def to_yaml(data: Any) -> str:
    import yaml  # only an experiment needs it

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)


# ---- git and environment ----------------------------------------------------------------------


def run_git(cwd: str, *args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT, check=True
    )
    return out.stdout


def git_info(cwd: str) -> tuple[dict[str, Any], str | None]:
    """``git.json`` content and the uncommitted diff (None when clean or unavailable)."""
    try:
        top = run_git(cwd, "rev-parse", "--show-toplevel").strip()
    except FileNotFoundError:
        return {"available": False, "reason": "git is not installed"}, None
    except subprocess.CalledProcessError as e:
        return {"available": False, "reason": (e.stderr or "not a git repository").strip()}, None
    except (subprocess.TimeoutExpired, OSError) as e:
        return {"available": False, "reason": f"git failed: {e}"}, None
    info: dict[str, Any] = {"available": True, "root": top}

    def opt(*args: str) -> str | None:
        try:
            return run_git(top, *args).strip() or None
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
    for name in PACKAGES:
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
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
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
