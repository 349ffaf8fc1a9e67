"""Retention: which checkpoints of a run to keep, and applying that to any store.

One policy, applied the same way to the daemon's local root (a ``LocalStore``) and to a remote
store. A checkpoint is kept if it is among the newest ``keep_last``, a multiple of ``keep_every``,
or among the best ``keep_best`` by a metric its manifest records; the newest checkpoint is always
kept, because it is the one a resume needs. Deleting is ordered so a reader never sees a
checkpoint with a missing file: the manifest goes first (the checkpoint becomes invisible), then
the data. A failed delete is logged and skipped, never fatal.

Dropping optimizer state (``keep_optim_last``) is the one deliberate exception to "no object of a
committed checkpoint is ever rewritten": the checkpoint's ``MANIFEST.json`` is rewritten first to
list fewer files (and name the dropped ones in ``optimizer_dropped``), then those files are
deleted. The files the manifest still lists are never touched, so the slimmed checkpoint still
verifies and loads its weights; a reader racing the rewrite sees either manifest, both valid.

Shared data (``<run>/shared/``, files that several checkpoints list: ``ckptd.blobs``) is deleted by
reference, after the checkpoints: a blob goes only when no manifest listed after the deletions
names it, no save in flight in the daemon uses it, and (in a store other daemons write to) it is
older than a grace period (``collect_blobs``).

Only what a validated manifest names is deleted: keys ``<run>/checkpoints/<tag>/<file>`` whose run,
tag and file names pass the name rule, under the tag the manifest was found under (a manifest
naming another tag is invisible, see ``ckptd.manifest``). In a local store nothing is deleted
through a symbolic link (see ``storage.local``).
"""

from __future__ import annotations

import enum
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .blobs import BLOB_DIR, blob_files, is_digest
from .errors import CkptdError, ConfigError
from .names import check_name
from .storage import Store, join_key

log = logging.getLogger("ckptd.retention")


class BestMode(enum.StrEnum):
    MIN = "min"  # lower is better (a loss)
    MAX = "max"  # higher is better (an accuracy)


@dataclass(kw_only=True, slots=True, frozen=True)
class Retention:
    keep_last: int | None = None
    """Keep the newest N checkpoints (by step). None keeps all."""
    keep_every: int | None = None
    """Also keep every checkpoint whose step is a multiple of K (milestones)."""
    keep_optim_last: int | None = None
    """Keep optimizer state only in the newest M kept checkpoints (it is ~2x the weights).
    Rewrites those checkpoints' manifests: the one exception to never rewriting (see above)."""
    keep_best: int | None = None
    """Also keep the best B checkpoints by ``metric``. Set alone (no ``keep_last``), it deletes
    every checkpoint that is neither best nor the newest."""
    metric: str | None = None
    """The manifest metric (``save(..., metrics={name: value})``) that ranks for ``keep_best``.
    A checkpoint without it (or with a non-finite value) never counts as best."""
    mode: BestMode | str = BestMode.MIN
    """min: lower is better (a loss); max: higher is better (an accuracy)."""

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every", "keep_optim_last", "keep_best"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ConfigError(
                    f"{name} must be a positive integer (0 would delete the checkpoint a resume "
                    f"needs), not {value!r}"
                )
        try:
            object.__setattr__(self, "mode", BestMode(self.mode))  # frozen: normalize once
        except ValueError:
            choices = ", ".join(m.value for m in BestMode)
            raise ConfigError(
                f"keep-best mode must be one of {choices}, not {self.mode!r}"
            ) from None
        if self.keep_best is not None and not (isinstance(self.metric, str) and self.metric):
            raise ConfigError(
                "keep_best needs a metric to rank by (the name passed to save(metrics=...), "
                f"e.g. val_loss), not {self.metric!r}"
            )
        if self.metric is not None and self.keep_best is None:
            raise ConfigError(
                f"metric {self.metric!r} is set but keep_best is not: say how many best to keep"
            )

    @property
    def active(self) -> bool:
        return (
            self.keep_last is not None
            or self.keep_optim_last is not None
            or self.keep_best is not None
        )


@dataclass(slots=True)
class Plan:
    delete: list[dict[str, Any]]
    strip_optim: list[dict[str, Any]]
    blobs: list[str] = field(default_factory=list)
    """Shared blobs deleted (or, dry run, to delete) because no checkpoint lists them."""


def plan(
    manifests: list[dict[str, Any]], policy: Retention, protect: set[str] | None = None
) -> Plan:
    """Decide on manifests sorted oldest first. ``protect`` tags are never touched; the newest
    manifest (last in the list) is always kept, whatever the policy."""
    newest_first = list(reversed(manifests))
    newest_first.sort(key=lambda m: int(m.get("step", -1)), reverse=True)  # stable: ties keep order
    best = _best_tags(newest_first, policy)
    keep: list[dict[str, Any]] = []
    delete: list[dict[str, Any]] = []
    for i, m in enumerate(newest_first):
        step = int(m.get("step", -1))
        if policy.keep_last is not None:
            recent = i < policy.keep_last
        else:  # keep_best alone keeps only the best and the newest; no policy at all keeps all
            recent = i == 0 or policy.keep_best is None
        milestone = policy.keep_every is not None and step >= 0 and step % policy.keep_every == 0
        if recent or milestone or m["tag"] in best or m["tag"] in (protect or ()):
            keep.append(m)
        else:
            delete.append(m)
    strip: list[dict[str, Any]] = []
    if policy.keep_optim_last is not None:
        for m in keep[policy.keep_optim_last :]:
            if m["tag"] not in (protect or ()) and any(
                n.endswith(".optim.safetensors") for n in m["files"]
            ):
                strip.append(m)
    return Plan(delete, strip)


def _best_tags(newest_first: list[dict[str, Any]], policy: Retention) -> set[str]:
    """Tags of the best ``keep_best`` by ``metric``; a tie goes to the newer checkpoint."""
    if policy.keep_best is None or policy.metric is None:
        return set()
    ranked: list[tuple[float, int, str]] = []
    for i, m in enumerate(newest_first):
        value = _metric(m, policy.metric)
        if value is not None:
            ranked.append((-value if policy.mode == BestMode.MAX else value, i, m["tag"]))
    ranked.sort()
    return {tag for _, _, tag in ranked[: policy.keep_best]}


def _metric(m: dict[str, Any], name: str) -> float | None:
    """The finite number a manifest records for ``name``, else None: a manifest is untrusted,
    and a missing, non-numeric or NaN value must never outrank a real one."""
    metrics = m.get("metrics")
    value = metrics.get(name) if isinstance(metrics, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        value = float(value)
    except OverflowError:  # a huge JSON integer
        return None
    return value if math.isfinite(value) else None


async def apply(store: Store, run: str, policy: Retention, *, protect: set[str] | None = None,
                dry_run: bool = False, protect_blobs: Callable[[], set[str]] | None = None,
                blob_grace: float = 0.0, collect: bool = False) -> Plan:  # fmt: skip
    """Apply ``policy`` to the run ``run`` of ``store``; returns what it did (or would do).

    Then, when anything was deleted (or ``collect``), the run's shared blobs that no remaining
    manifest lists are deleted (``collect_blobs``)."""
    from .catalog import list_manifests  # the one place that knows how to list a run

    check_name(run, "run")
    manifests = await list_manifests(_Scoped(store, run))
    decided = plan(manifests, policy, protect or set())
    if dry_run:
        gone = {m["tag"] for m in decided.delete}
        decided.blobs = await collect_blobs(store, run, protect_blobs, blob_grace, dry_run=True,
                                            without=gone)  # fmt: skip
        return decided
    prefix = join_key(run, "checkpoints")
    for m in decided.delete:
        ck = join_key(prefix, m["tag"])
        try:
            await store.delete(join_key(ck, "MANIFEST.json"))
            for name in m["files"]:  # a shared file's key here is the root's hard link only
                await store.delete(join_key(ck, name))
            log.info("retention: deleted %s@%s from %s", run, m["tag"], store.url)
        except (CkptdError, OSError) as e:
            log.warning(
                "retention: could not delete %s@%s from %s: %s", run, m["tag"], store.url, e
            )
    for m in decided.strip_optim:
        ck = join_key(prefix, m["tag"])
        dropped = [n for n in m["files"] if n.endswith(".optim.safetensors")]
        slim = {**m, "files": {n: r for n, r in m["files"].items() if n not in dropped}}
        slim["optimizer_dropped"] = sorted(dropped)
        try:
            await store.put_bytes(
                join_key(ck, "MANIFEST.json"), json.dumps(slim, indent=1).encode()
            )
            for name in dropped:
                await store.delete(join_key(ck, name))
            log.info("retention: dropped optimizer state of %s@%s in %s", run, m["tag"], store.url)
        except (CkptdError, OSError) as e:
            log.warning("retention: could not slim %s@%s in %s: %s", run, m["tag"], store.url, e)
    if decided.delete or decided.strip_optim or collect:
        decided.blobs = await collect_blobs(store, run, protect_blobs, blob_grace)
    return decided


async def collect_blobs(
    store: Store,
    run: str,
    protect: Callable[[], set[str]] | None = None,
    grace: float = 0.0,
    *,
    dry_run: bool = False,
    without: set[str] | None = None,
) -> list[str]:
    """Delete the run's blobs (``<run>/shared/``) that no manifest lists; returns their names.

    Crash-safe by order: the manifests are listed after the checkpoints were deleted, and the
    blobs to keep are those they list, those ``protect()`` names (saves still in flight, asked
    last, after the listing) and those younger than ``grace`` seconds (another writer's save of
    the same run, e.g. a DCP rank on another node, whose manifest is not written yet). A listing
    that fails deletes nothing. ``without``: tags to count as deleted already (a dry run).
    """
    from .catalog import list_manifests

    shared = join_key(run, BLOB_DIR)
    objects = await store.list(shared + "/")
    if not objects:
        return []
    manifests = await list_manifests(_Scoped(store, run))
    keep = set(blob_files(m for m in manifests if m["tag"] not in (without or ())))
    if protect is not None:
        keep |= protect()
    now = time.time()
    gone = []
    for o in objects:
        name = o.key[len(shared) + 1 :]
        if name in keep or not _blob_like(name):  # e.g. run "<run>/shared"'s own files
            continue
        if grace > 0 and (o.mtime is None or now - o.mtime < grace):
            continue
        gone.append(name)
        if dry_run:
            continue
        try:
            await store.delete(o.key)
            log.info("retention: deleted blob %s/%s from %s (no checkpoint lists it)",
                     shared, name, store.url)  # fmt: skip
        except (CkptdError, OSError) as e:
            log.warning("retention: could not delete blob %s from %s: %s", o.key, store.url, e)
    return gone


class _Scoped(Store):
    """A view of ``store`` under ``prefix`` (read-only use: listing and reading manifests)."""

    def __init__(self, store: Store, prefix: str) -> None:
        self._store = store
        self._prefix = prefix
        self.url = join_key(store.url, prefix) if "://" in store.url else f"{store.url}/{prefix}"

    async def check_access(self) -> None:
        await self._store.check_access()

    async def put_file(self, key: str, path: str, **kw: Any) -> None:  # type: ignore[override]
        await self._store.put_file(join_key(self._prefix, key), path, **kw)

    async def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        await self._store.put_bytes(join_key(self._prefix, key), data, if_absent=if_absent)

    async def get_bytes(
        self, key: str, *, start: int | None = None, end: int | None = None
    ) -> bytes:
        return await self._store.get_bytes(join_key(self._prefix, key), start=start, end=end)

    async def get_file(self, key: str, path: str, *, size: int | None = None) -> None:
        await self._store.get_file(join_key(self._prefix, key), path, size=size)

    async def list(self, prefix: str):  # type: ignore[no-untyped-def]
        from .storage import ObjectInfo

        n = len(self._prefix) + 1
        full = join_key(self._prefix, prefix) + ("/" if prefix.endswith("/") else "")
        return [ObjectInfo(o.key[n:], o.size) for o in await self._store.list(full)]

    async def delete(self, key: str) -> None:
        await self._store.delete(join_key(self._prefix, key))


def _blob_like(name: str) -> bool:
    """A file name that a blob can have: ``<digest>`` or ``<digest>.<ext>``, no directory."""
    digest, _, ext = name.partition(".")
    return "/" not in name and is_digest(digest) and "." not in ext
