"""Why a checkpoint is not in its store, as one small typed reason an operator can act on.

"2 checkpoints not in s3://b/p: store unreachable since 12:03:41 (25s), 1.1 GiB to go" says
what to fix; a byte count does not. The reason is decided by the exception's type alone (the
backends translate their SDK errors into the typed tree of ``ckptd.errors``), never by its
text. The daemon records it on the job (``reason``, ``reason_since``: when this reason was
first seen in a row, ``attempts``: failed attempts since then, ``error``: the last one, one
line); ``drain``, ``exec`` and ``status`` read those fields back from the job dicts.

No torch and no daemon state here: the CLI imports ``explain``.
"""

from __future__ import annotations

import enum
import errno
import time
from collections.abc import Iterable
from typing import Any, Protocol

from ..errors import (
    AccessDeniedError,
    AlreadyExistsError,
    BucketMissingError,
    IntegrityError,
    PermanentStorageError,
    StoreUnreachableError,
    TransientStorageError,
)
from ..progress import human_bytes, human_duration

__all__ = [
    "PERMANENT",
    "Reason",
    "classify",
    "clear",
    "explain",
    "note",
    "one_line",
    "stuck",
    "stuck_advice",
]

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_MAX_LINE = 240


class Reason(enum.StrEnum):
    UNREACHABLE = "store unreachable"  # no answer: the store or the network is down
    UNAVAILABLE = "store failing"  # it answers 5xx / throttles
    BUCKET_MISSING = "bucket missing"
    ACCESS_DENIED = "access denied"  # 401/403, or no/rejected credentials
    DISK_FULL = "disk full"
    REFUSED = "server refused"  # any other refusal: a checksum, a tag that is another writer's
    UNKNOWN = "unknown"


PERMANENT = frozenset({Reason.BUCKET_MISSING, Reason.ACCESS_DENIED, Reason.REFUSED})
"""Reasons a quick retry will not fix: the daemon re-checks them with a long backoff, and
``drain``/``exec`` stop waiting once every checkpoint left has one of them."""


def _disk_full(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):  # the OSError may be the cause of a translated storage error
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL:
            return True
        seen = seen.__cause__
    return False


def classify(exc: BaseException) -> Reason:
    """The reason for ``exc``, by its type (and an OSError's errno)."""
    if _disk_full(exc):
        return Reason.DISK_FULL
    if isinstance(exc, BucketMissingError):
        return Reason.BUCKET_MISSING
    if isinstance(exc, AccessDeniedError | PermissionError):
        return Reason.ACCESS_DENIED
    if isinstance(exc, StoreUnreachableError):
        return Reason.UNREACHABLE
    if isinstance(exc, TransientStorageError):
        return Reason.UNAVAILABLE
    if isinstance(exc, PermanentStorageError | IntegrityError | AlreadyExistsError):
        return Reason.REFUSED
    return Reason.UNKNOWN


def one_line(exc: BaseException | str) -> str:
    """An error as one bounded line (SDK messages can span lines and kilobytes)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MAX_LINE else text[: _MAX_LINE - 1] + "…"


class _Troubled(Protocol):
    reason: str | None
    reason_since: float | None
    attempts: int
    error: str | None


def note(job: _Troubled, exc: BaseException, error: str, now: float | None = None) -> bool:
    """Record a failed attempt on ``job``; True when its reason changed (worth a log line)."""
    reason = classify(exc)
    changed = job.reason != reason
    if changed:
        job.reason = str(reason)
        job.reason_since = time.time() if now is None else now
        job.attempts = 0
    job.attempts += 1
    job.error = one_line(error)
    return changed


def clear(job: _Troubled) -> None:
    job.reason = job.reason_since = None
    job.attempts = 0


# ---- for the CLI: job dicts (status, drain replies) -> sentences ------------------------------------


def _left(j: dict[str, Any]) -> int:
    return max(0, int(j.get("bytes_total") or 0) - int(j.get("bytes_uploaded") or 0))


def _why(j: dict[str, Any]) -> str:
    if j.get("state") == "failed":
        return f"failed ({j['reason']})" if j.get("reason") else "failed"
    if j.get("reason"):
        return str(j["reason"])
    if j.get("state") in ("staged", "writing"):
        return "not committed yet"
    if j.get("state") == "uploading":
        return "uploading"
    return "waiting to upload"


def explain(jobs: Iterable[dict[str, Any]], now: float | None = None) -> list[str]:
    """One sentence per (store, reason) of the checkpoints in ``jobs``, e.g. ``2 checkpoints
    not in s3://b/p: store unreachable since 12:03:41 (25s), 1.1 GiB to go``."""
    now = time.time() if now is None else now
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for j in jobs:
        groups.setdefault((str(j.get("store") or "the root"), _why(j)), []).append(j)
    out = []
    for (store, why), group in groups.items():
        n = len(group)
        line = f"{n} checkpoint{'s' if n != 1 else ''} not in {store}: {why}"
        sinces = [float(j["reason_since"]) for j in group if j.get("reason_since")]
        if sinces:
            since = min(sinces)
            clock = time.strftime("%H:%M:%S", time.localtime(since))
            line += f" since {clock} ({human_duration(now - since)})"
        attempts = sum(int(j.get("attempts") or 0) for j in group)
        if attempts:
            line += f", {attempts} attempt{'s' if attempts != 1 else ''}"
        line += f", {human_bytes(sum(_left(j) for j in group))} to go"
        errors = [j["error"] for j in group if j.get("error")]
        if errors:
            line += f"; last error: {one_line(errors[-1])}"
        out.append(line)
    return out


def stuck(j: dict[str, Any]) -> bool:
    """Whether waiting will not bring this checkpoint into its store: it failed for good, or
    its store said no (the daemon re-checks that slowly, in case someone fixes it)."""
    return j.get("state") == "failed" or j.get("reason") in PERMANENT


def stuck_advice(jobs: Iterable[dict[str, Any]], where: str) -> str | None:
    """What to do about the stuck ones among ``jobs``, naming commands that work now;
    ``where`` is how those commands reach the daemon (``--socket PATH`` or ``--root DIR``)."""
    names = [f"{j['run']}@{j['tag']}" for j in jobs if stuck(j) and not j.get("part")]
    if not names:
        return None
    return (
        f"{len(names)} checkpoint(s) will not reach their store by waiting ({', '.join(names[:3])}"
        f"{', ...' if len(names) > 3 else ''}). Fix the store (the daemon re-checks a store that "
        f"refused every 30 s to 5 min) and run `ckptd drain {where}`, or give one up on "
        f"purpose (the local copy stays): `ckptd abandon {where} {names[0]}`"
    )
