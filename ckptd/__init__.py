"""ckptd: stall-free, crash-safe PyTorch checkpoints through a node-local sidecar daemon.

The training process stages tensors into shared memory and goes on; the daemon (``ckptd serve``)
commits them atomically on local disk and uploads them to S3 or GCS.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .client import Backpressure, Checkpointer, SaveHandle, attach
from .errors import (
    CkptdError,
    ConfigError,
    DaemonUnavailableError,
    IntegrityError,
    NotFoundError,
    PermanentStorageError,
    ProtocolError,
    SaveError,
    SerializationError,
    StorageError,
    TransientStorageError,
)
from .reader import list_checkpoints, load, verify

__all__ = [
    "Backpressure",
    "Checkpointer",
    "CkptdError",
    "ConfigError",
    "DaemonUnavailableError",
    "IntegrityError",
    "NotFoundError",
    "PermanentStorageError",
    "ProtocolError",
    "SaveError",
    "SaveHandle",
    "SerializationError",
    "StorageError",
    "TransientStorageError",
    "__version__",
    "attach",
    "list_checkpoints",
    "load",
    "verify",
]
