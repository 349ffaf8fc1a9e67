"""``ckptd serve``'s settings: one keyword-only dataclass, validated where it is built."""

from __future__ import annotations

import grp
import os
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..retention import Retention
from .preempt import PreemptionConfig


@dataclass(kw_only=True)
class DaemonConfig:
    root: str
    """Local directory: checkpoints are committed here first (and it is the store by default)."""
    socket: str
    """Unix socket path clients connect to; created owner-only."""
    store: str | None = None
    """Default store URL for runs whose client names none; None: the root is the store."""
    writers: int = 2
    """Checkpoints written to local disk at once."""
    uploads: int = 2
    """Checkpoints uploaded at once (each with ``file_concurrency`` files in flight)."""
    file_concurrency: int = 4
    drain_timeout: float = 80.0
    """SIGTERM's upper bound for finishing uploads: below systemd's 90 s and AWS spot's 120 s."""
    check_store: bool = True
    """Probe the default store at start and refuse to run if it is unusable."""
    retention: Retention = field(default_factory=Retention)
    """What to keep in the store (and in the root, when the root is the store)."""
    local_retention: Retention = field(default_factory=Retention)
    """What to keep in the root when uploading elsewhere; only uploaded copies are deleted."""
    preemption: PreemptionConfig | None = None
    """Spot/preemption notices to watch; None watches nothing."""
    group: str | None = None
    """A group to share the socket and the files with (read-only for files); None: owner-only,
    because checkpoints are the user's weights and other local users must not read them."""
    mirror_max_file_size: int | None = 1 << 30
    """Experiment files larger than this are not mirrored (logged); None: no cap."""
    gid: int = field(default=-1, init=False)

    def __post_init__(self) -> None:
        if self.writers < 1 or self.uploads < 1 or self.file_concurrency < 1:
            raise ConfigError("writers, uploads and file_concurrency must be at least 1")
        if self.drain_timeout <= 0:
            raise ConfigError("drain_timeout must be positive: an unbounded drain outlives the VM")
        if self.group is not None:
            try:
                self.gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise ConfigError(f"no group named {self.group!r} on this machine") from None
        self.root = os.path.abspath(os.path.expanduser(self.root))
        self.socket = os.path.abspath(os.path.expanduser(self.socket))
