"""ckptd: stall-free, crash-safe PyTorch checkpoints through a node-local sidecar daemon.

The training process stages tensors into shared memory and goes on; the daemon (``ckptd serve``)
commits them atomically on local disk and uploads them to S3 or GCS.

Names that need torch load on first use, so that ``ckptd`` the command and the daemon start
fast and stay small (the daemon never imports torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    AccessDeniedError,
    AlreadyExistsError,
    BucketMissingError,
    CkptdError,
    ConfigError,
    CredentialsError,
    DaemonUnavailableError,
    IntegrityError,
    NotFoundError,
    PermanentStorageError,
    ProtocolError,
    RestoreError,
    SaveError,
    SerializationError,
    StorageError,
    StoreUnreachableError,
    TransientStorageError,
)

__version__ = "0.1.0"

_LAZY = {
    "Backpressure": "client",
    "Checkpointer": "client",
    "SaveHandle": "client",
    "attach": "client",
    "Experiment": "experiment",
    "load_config": "experiment",
    "load": "reader",
    "list_checkpoints": "catalog",
    "verify": "catalog",
}

if TYPE_CHECKING:
    from .catalog import list_checkpoints, verify
    from .client import Backpressure, Checkpointer, SaveHandle, attach
    from .experiment import Experiment, load_config
    from .reader import load


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptd' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AccessDeniedError",
    "AlreadyExistsError",
    "Backpressure",
    "BucketMissingError",
    "Checkpointer",
    "CkptdError",
    "ConfigError",
    "CredentialsError",
    "DaemonUnavailableError",
    "Experiment",
    "IntegrityError",
    "NotFoundError",
    "PermanentStorageError",
    "ProtocolError",
    "RestoreError",
    "SaveError",
    "SaveHandle",
    "SerializationError",
    "StorageError",
    "StoreUnreachableError",
    "TransientStorageError",
    "__version__",
    "attach",
    "list_checkpoints",
    "load",
    "load_config",
    "verify",
]
