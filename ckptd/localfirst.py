"""Local first: read a store's checkpoint from this node's daemon root when it holds the same one.

The daemon commits every checkpoint into its root before uploading it, so after a restart on
the same node (a preempted job coming back) ``ckptd.load("s3://bucket/prefix/run")`` would
download bytes that already lie on local disk. ``local_twin`` finds that copy: the daemon that
answers on this node's socket names its root and default store; when the URL is
``<store>/<run>``, ``<root>/<run>/checkpoints/<tag>`` is the candidate, and it is used only when
its ``MANIFEST.json`` is identical to the store's (tag, step, creation time, every file's size
and CRC32C): the manifest decides, as everywhere. Its files are then verified as they are read,
and a copy that fails falls back to the store. No daemon, another store, no copy: None, at the
cost of one failed ``connect`` (or a hello when a daemon runs). No torch here.
"""

from __future__ import annotations

import logging
import os

from .catalog import Located, checkpoint_directory
from .connection import Connection
from .defaults import default_socket
from .errors import CkptdError, ConfigError
from .names import check_name
from .protocol import HelloRequest, Welcome
from .storage import is_local

__all__ = ["daemon_places", "local_twin"]

log = logging.getLogger("ckptd.localfirst")
_HELLO_TIMEOUT_S = 2.0


def daemon_places(socket: str | None = None) -> tuple[str, str | None] | None:
    """(root, default store) of the daemon on this node's socket, or None when none answers."""
    path = socket or default_socket()
    if not os.path.exists(path):
        return None
    try:
        conn = Connection(path, _HELLO_TIMEOUT_S)
    except (CkptdError, OSError):
        return None
    try:
        info = conn.request(HelloRequest(pid=os.getpid()))
    except (CkptdError, OSError):
        return None
    finally:
        conn.close()
    return (info.root, info.store) if isinstance(info, Welcome) else None


def local_twin(loc: Located, places: tuple[str, str | None] | None) -> Located | None:
    """The copy of ``loc`` (a store checkpoint) in the daemon root of ``places``, when there
    is one whose manifest is identical; else None."""
    if places is None or loc.directory is not None or is_local(loc.url):
        return None
    root, store = places
    if not root or not store or is_local(store):
        return None
    prefix = store.rstrip("/") + "/"
    if not loc.url.startswith(prefix):
        return None
    try:
        run = check_name(loc.url[len(prefix) :], "run")
        path = os.path.join(root, run, "checkpoints", check_name(loc.tag, "tag"))
        found = checkpoint_directory(path)
    except (CkptdError, OSError) as e:  # a bad name, or an unreadable copy: use the store
        if not isinstance(e, ConfigError):
            log.info("no usable local copy of %s@%s: %s", loc.url, loc.tag, e)
        return None
    if found is None or found[1] != loc.manifest:
        return None
    return Located(found[0], loc.tag, found[1], directory=found[0])
