"""``ckptd serve``'s settings: one keyword-only dataclass, validated where it is built."""

from __future__ import annotations

import grp
import os
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..retention import Retention
from ..storage.options import StoreOptions
from .preempt import PreemptionConfig

KEEP_LOCAL = 3
"""Local copies kept per run by default when uploading elsewhere: enough to resume from without a
download, few enough that a long run does not fill the disk. Only verified uploads are deleted."""


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
    local_retention: Retention = field(default_factory=lambda: Retention(keep_last=KEEP_LOCAL))
    """What to keep in the root when uploading elsewhere: the newest ``KEEP_LOCAL`` by default
    (``Retention()`` keeps all). A copy whose upload is owed is never deleted, nor the newest."""
    blob_grace: float = 3600.0
    """Seconds a store's shared blob that no manifest lists yet is kept (another node's rank
    may be about to list it); the root's are collected at once (only this daemon writes it)."""
    upload_every: int = 1
    """Upload every K-th committed checkpoint of a run (counted since the daemon started); the
    others stay "local only". The newest one of each run is uploaded anyway at a drain, at
    SIGTERM and on a preemption notice, so what a resume needs always reaches the store."""
    upload_limit: float | None = None
    """Bytes per second shared by every upload of this daemon: each part, chunk or small file
    to S3 or GCS waits its turn before it is sent (manifests and ``latest`` do not; nor a local
    store, which copies at disk speed). None: unlimited. Bursts of one second's worth."""
    store_options: StoreOptions = field(default_factory=StoreOptions)
    """Encryption and storage class of every object written to an S3 or GCS store (checked
    here against the default store's kind; recorded in each manifest as ``store_options``)."""
    preemption: PreemptionConfig | None = None
    """Spot/preemption notices to watch; None watches nothing."""
    group: str | None = None
    """A group to share the socket and the files with (read-only for files); None: owner-only,
    because checkpoints are the user's weights and other local users must not read them."""
    mirror_max_file_size: int | None = 1 << 30
    """Experiment files larger than this are not mirrored (logged); None: no cap."""
    metrics_port: int | None = None
    """Serve Prometheus metrics on this TCP port (0: any free one); None: no endpoint."""
    metrics_host: str = "127.0.0.1"
    """Address of the metrics endpoint: loopback by default, as the page names runs."""
    gid: int = field(default=-1, init=False)

    def __post_init__(self) -> None:
        if self.writers < 1 or self.uploads < 1 or self.file_concurrency < 1:
            raise ConfigError("writers, uploads and file_concurrency must be at least 1")
        if isinstance(self.upload_every, bool) or not (
            isinstance(self.upload_every, int) and self.upload_every >= 1
        ):
            raise ConfigError(
                f"upload_every must be a positive integer (1 uploads every checkpoint), not "
                f"{self.upload_every!r}"
            )
        if self.upload_limit is not None and not self.upload_limit > 0:
            raise ConfigError(f"upload_limit must be positive bytes/s, not {self.upload_limit!r}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be 0..65535, not {self.metrics_port}")
        if self.store_options:
            scheme = self.store.split("://", 1)[0].lower() if "://" in (self.store or "") else ""
            self.store_options.check("file" if scheme in ("", "file") else scheme)
        if self.drain_timeout <= 0:
            raise ConfigError("drain_timeout must be positive: an unbounded drain outlives the VM")
        if self.group is not None:
            try:
                self.gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise ConfigError(f"no group named {self.group!r} on this machine") from None
        self.root = os.path.abspath(os.path.expanduser(self.root))
        self.socket = os.path.abspath(os.path.expanduser(self.socket))
