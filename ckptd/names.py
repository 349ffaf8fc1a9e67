"""Run, tag and model names: they become path components locally and key parts in a store."""

from __future__ import annotations

import re
from typing import TypeVar

from .errors import ConfigError

T = TypeVar("T")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,199}$")


def named(one: T | None, many: dict[str, T] | None, default: str = "model") -> dict[str, T]:
    """``model=`` / ``models=`` style arguments as one dict: the single one under ``default``."""
    out = dict(many or {})
    if one is not None:
        out.setdefault(default, one)
    return out


def check_name(value: object, what: str) -> str:
    """Refuse anything that could escape its directory or confuse a reader.

    Allowed: letters, digits and ``. _ = + -``, not starting with a dot or dash, at most 200
    characters, and never ending in ``.partial`` (the suffix of uncommitted directories).
    A run may have ``/``-separated parts (``project/name/2026-11-25_10-00-00``), each checked alike.
    """
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, not {type(value).__name__}")
    parts = value.split("/") if what == "run" else [value]
    for part in parts:
        if not _NAME.match(part) or part.endswith(".partial") or ".tmp-" in part:
            raise ConfigError(
                f"invalid {what} {value!r}: use letters, digits and . _ = + - "
                "(not starting with . or -, no path separators, at most 200 characters)"
            )
    if what == "model name" and value in RESERVED_MODEL_NAMES:
        raise ConfigError(f"{value!r} cannot name a model: load() uses it for other state")
    return value


RESERVED_MODEL_NAMES = frozenset({"optimizer", "optimizers", "extra", "meta"})


def make_tag(step: int, epoch: int | None = None, sample: int | None = None) -> str:
    """``E{epoch}_U{update}_S{sample}`` when the progress is known, else ``step-{n:08d}``."""
    if epoch is not None and sample is not None:
        return f"E{epoch}_U{step}_S{sample}"
    return f"step-{step:08d}"
