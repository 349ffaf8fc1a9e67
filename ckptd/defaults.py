"""Where things are when nobody says: the socket, the root and the store."""

from __future__ import annotations

import os


def default_socket() -> str:
    """``$CKPTD_SOCKET``, else ``$XDG_RUNTIME_DIR/ckptd/ckptd.sock``, else ``/tmp/ckptd-$UID/ckptd.sock``."""
    env = os.environ.get("CKPTD_SOCKET")
    if env:
        return env
    runtime = os.environ.get("RUNTIME_DIRECTORY") or os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime.split(":")[0], "ckptd", "ckptd.sock")
    return f"/tmp/ckptd-{os.getuid()}/ckptd.sock"


def default_root() -> str:
    """``$CKPTD_ROOT``, else systemd's ``$STATE_DIRECTORY``, else ``~/.local/share/ckptd``."""
    env = os.environ.get("CKPTD_ROOT") or os.environ.get("STATE_DIRECTORY")
    if env:
        return os.path.abspath(env.split(":")[0])
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "ckptd")


def default_store() -> str | None:
    """``$CKPTD_STORE``; None means the daemon's root is the store (nothing to upload)."""
    return os.environ.get("CKPTD_STORE") or None
