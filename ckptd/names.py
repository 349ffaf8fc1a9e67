"""Run, tag, model and file names: they become path components locally and key parts in a store.

One rule for every name that becomes a path, whether a client or a manifest supplied it, checked
before any I/O: no traversal, no absolute paths, no control characters (a trailing newline
included: the pattern is matched with ``fullmatch``, never ``match`` with ``$``), and no run parts
that the store layout reserves for itself.
"""

from __future__ import annotations

import re
from typing import TypeVar

from .errors import ConfigError

T = TypeVar("T")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]{0,199}")

RESERVED_RUN_PARTS = frozenset({"checkpoints", "experiment", "latest", ".ckptd"})
"""Names the layout gives a meaning below ``<store>/<run>/``: a run part called ``checkpoints``
would make ``<store>/a/checkpoints/b/checkpoints/...`` ambiguous (the daemon's rescan took it for
run ``a`` and dropped its checkpoints). ``shared`` (a run's blobs, ``ckptd.blobs``) is not
reserved: a run ``a/shared`` nests below run ``a``'s blobs, whose gc only ever deletes files
directly in ``a/shared/`` named like blobs, so the two never touch each other's data."""

RESERVED_MODEL_NAMES = frozenset({"optimizer", "optimizers", "extra", "meta"})

MANIFEST = "MANIFEST.json"
"""The commit marker of a checkpoint; never a file that a manifest lists."""


def named(one: T | None, many: dict[str, T] | None, default: str = "model") -> dict[str, T]:
    """``model=`` / ``models=`` style arguments as one dict: the single one under ``default``."""
    out = dict(many or {})
    if one is not None:
        out.setdefault(default, one)
    return out


def _valid_part(part: str) -> bool:
    return (
        _NAME.fullmatch(part) is not None and not part.endswith(".partial") and ".tmp-" not in part
    )


def check_name(value: object, what: str) -> str:
    """Refuse anything that could escape its directory or confuse a reader.

    Allowed: letters, digits and ``. _ = + -``, not starting with a dot or dash, at most 200
    characters, and never ending in ``.partial`` (the suffix of uncommitted directories).
    A run may have ``/``-separated parts (``project/name/2026-11-25_10-00-00``), each checked alike
    and none of them one the layout reserves (``checkpoints``, ``experiment``, ``latest``).
    """
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, not {type(value).__name__}")
    parts = value.split("/") if what == "run" else [value]
    for part in parts:
        if not _valid_part(part):
            raise ConfigError(
                f"invalid {what} {value!r}: use letters, digits and . _ = + - "
                "(not starting with . or -, no path separators, at most 200 characters)"
            )
        if what == "run" and part in RESERVED_RUN_PARTS:
            raise ConfigError(
                f"invalid run {value!r}: {part!r} is reserved by the store layout "
                f"(reserved: {', '.join(sorted(RESERVED_RUN_PARTS))})"
            )
    if what == "model name" and value in RESERVED_MODEL_NAMES:
        raise ConfigError(f"{value!r} cannot name a model: load() uses it for other state")
    return value


def check_file_name(value: object, what: str = "file name") -> str:
    """A file of a checkpoint: one path component under the name rule, and not the manifest."""
    check_name(value, what)
    if value == MANIFEST:
        raise ConfigError(f"{what} {MANIFEST!r} is the commit marker, not a listed file")
    return value  # type: ignore[return-value]  # check_name proved it is a str


def make_tag(step: int, epoch: int | None = None, sample: int | None = None) -> str:
    """``E{epoch}_U{update}_S{sample}`` when the progress is known, else ``step-{n:08d}``."""
    if epoch is not None and sample is not None:
        return f"E{epoch}_U{step}_S{sample}"
    return f"step-{step:08d}"
