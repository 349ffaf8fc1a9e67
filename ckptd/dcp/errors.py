"""Errors ``ckptd.dcp`` raises in DCP's own shape, still inside ``ckptd.errors``' tree.

DCP wraps whatever a storage writer raises in its ``CheckpointException``; code written for
``FileSystemWriter`` looks there for a ``RuntimeError`` saying "Checkpoint already exists".
"""

from __future__ import annotations

from ..errors import AlreadyExistsError


class CheckpointExistsError(AlreadyExistsError, RuntimeError):
    """The ``checkpoint_id`` is committed already; ckptd never overwrites one (there is no
    ``overwrite=True``). An ``AlreadyExistsError`` (so a ``FileExistsError``) and, like
    ``FileSystemWriter(overwrite=False)``'s refusal, a ``RuntimeError``."""


__all__ = ["CheckpointExistsError"]
