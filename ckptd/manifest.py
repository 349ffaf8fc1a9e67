"""The one schema check for ``MANIFEST.json``, applied wherever a manifest is read.

A manifest is the only thing a reader trusts, so it is checked before any of its names becomes a
path or any of its numbers an allocation: a JSON object whose ``tag`` is the tag it was found
under, whose ``files`` map names that pass the name rule to ``{size, crc32c}`` (and, for data shared
with other checkpoints, ``blob``: a content digest, see ``ckptd.blobs``), and whose ``step``
is an integer. Everything wrong raises ``IntegrityError`` naming the checkpoint, so callers decide
by that one type (listings skip the checkpoint, an explicit request fails).
"""

from __future__ import annotations

import json
import re
from typing import Any

from .blobs import is_digest
from .errors import ConfigError, IntegrityError
from .names import check_file_name, check_name

MAX_MANIFEST_BYTES = 64 << 20
"""A manifest lists files, not data: 64 MiB is ~500,000 entries, far past any real checkpoint."""
MAX_FILES = 1 << 19
MAX_FILE_SIZE = 1 << 50
"""1 PiB per file: beyond any tensor file, and small enough that no size from a manifest can
overflow an offset or ask for an absurd allocation."""
_STEP_BOUND = 1 << 63
_CRC = re.compile(r"[0-9a-fA-F]{8}")

__all__ = ["MAX_MANIFEST_BYTES", "parse", "validate"]


def parse(raw: bytes, *, tag: str | None, where: str) -> dict[str, Any]:
    """Decode and validate the bytes of a ``MANIFEST.json``; ``where`` names it in errors."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"{where}: MANIFEST.json is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise IntegrityError(f"{where}: MANIFEST.json is not JSON: {e}") from e
    return validate(obj, tag=tag, where=where)


def validate(obj: Any, *, tag: str | None, where: str = "checkpoint") -> dict[str, Any]:
    """Check a decoded manifest; returns it. ``tag`` is the tag it was found under (None for a
    bare checkpoint directory, whose own name says nothing)."""

    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"{where}: bad MANIFEST.json: {why}")

    if not isinstance(obj, dict):
        raise bad(f"a JSON {type(obj).__name__}, not an object")
    own = obj.get("tag")
    try:
        check_name(own, "tag")
    except ConfigError as e:
        raise bad(str(e)) from None
    if tag is not None and own != tag:
        raise bad(f"it names tag {own!r} but lies under {tag!r}")
    step = obj.get("step")
    if not _is_int(step) or not -_STEP_BOUND <= step < _STEP_BOUND:
        raise bad(f"step {step!r} is not an integer")
    for key in ("created", "kind", "run_id"):
        if key in obj and not isinstance(obj[key], str):
            raise bad(f"{key} {obj[key]!r} is not a string")
    files = obj.get("files")
    if not isinstance(files, dict):
        raise bad("no files table")
    if len(files) > MAX_FILES:
        raise bad(f"{len(files)} files listed (at most {MAX_FILES})")
    for name, rec in files.items():
        try:
            check_file_name(name)
        except ConfigError as e:
            raise bad(f"it lists a file outside its checkpoint: {e}") from None
        if not isinstance(rec, dict):
            raise bad(f"{name}: record is not an object")
        size, crc = rec.get("size"), rec.get("crc32c")
        if not _is_int(size) or not 0 <= size <= MAX_FILE_SIZE:
            raise bad(f"{name}: size {size!r} is not an integer in [0, {MAX_FILE_SIZE}]")
        if not isinstance(crc, str) or _CRC.fullmatch(crc) is None:
            raise bad(f"{name}: crc32c {crc!r} is not 8 hex digits")
        if "blob" in rec and not is_digest(rec["blob"]):
            raise bad(f"{name}: blob {rec['blob']!r} is not a 64 hex digit content digest")
    return obj


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
