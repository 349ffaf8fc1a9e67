"""Retention: which checkpoints of a run to keep, and applying that to any store.

One policy, applied the same way to the daemon's local root (a ``LocalStore``) and to a remote
store. Deleting is ordered so a reader never sees a checkpoint with a missing file: the manifest
goes first (the checkpoint becomes invisible), then the data. Dropping optimizer state from an
older checkpoint rewrites its manifest without those files first, then deletes them. A failed
delete is logged and skipped, never fatal.

Only what a validated manifest names is deleted: keys ``<run>/checkpoints/<tag>/<file>`` whose run,
tag and file names pass the name rule, under the tag the manifest was found under (a manifest
naming another tag is invisible, see ``ckptd.manifest``). In a local store nothing is deleted
through a symbolic link (see ``storage.local``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from .errors import CkptdError, ConfigError
from .names import check_name
from .storage import Store, join_key

log = logging.getLogger("ckptd.retention")


@dataclass(kw_only=True, slots=True, frozen=True)
class Retention:
    keep_last: int | None = None
    """Keep the newest N checkpoints (by step). None keeps all."""
    keep_every: int | None = None
    """Also keep every checkpoint whose step is a multiple of K (milestones)."""
    keep_optim_last: int | None = None
    """Keep optimizer state only in the newest M kept checkpoints (it is ~2x the weights)."""

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every", "keep_optim_last"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(
                    f"{name} must be a positive integer (0 would delete the checkpoint a resume "
                    f"needs), not {value!r}"
                )

    @property
    def active(self) -> bool:
        return self.keep_last is not None or self.keep_optim_last is not None


@dataclass(slots=True)
class Plan:
    delete: list[dict[str, Any]]
    strip_optim: list[dict[str, Any]]


def plan(
    manifests: list[dict[str, Any]], policy: Retention, protect: set[str] | None = None
) -> Plan:
    """Decide on manifests sorted oldest first. ``protect`` tags are never touched."""
    newest_first = sorted(manifests, key=lambda m: int(m.get("step", -1)), reverse=True)
    keep: list[dict[str, Any]] = []
    delete: list[dict[str, Any]] = []
    for i, m in enumerate(newest_first):
        step = int(m.get("step", -1))
        recent = policy.keep_last is None or i < policy.keep_last
        milestone = policy.keep_every is not None and step >= 0 and step % policy.keep_every == 0
        if recent or milestone or m["tag"] in (protect or ()):
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


async def apply(store: Store, run: str, policy: Retention, *, protect: set[str] | None = None,
                dry_run: bool = False) -> Plan:  # fmt: skip
    """Apply ``policy`` to the run ``run`` of ``store``; returns what it did (or would do)."""
    from .catalog import _list_manifests  # the one place that knows how to list a run

    check_name(run, "run")
    manifests = await _list_manifests(_Scoped(store, run))
    decided = plan(manifests, policy, protect or set())
    if dry_run:
        return decided
    prefix = join_key(run, "checkpoints")
    for m in decided.delete:
        ck = join_key(prefix, m["tag"])
        try:
            await store.delete(join_key(ck, "MANIFEST.json"))
            for name in m["files"]:
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
    return decided


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
