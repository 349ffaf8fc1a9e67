"""Upload stage: committed checkpoint -> store. Data files first, MANIFEST.json, then ``latest``.

Uploads read the committed files themselves (never a staging copy). Whether a checkpoint still
needs uploading is on disk, not in memory: ``<root>/.ckptd/uploads/<run>/<tag>.json`` is written
before the manifest and removed after the store has the manifest, so a restarted daemon finds
every upload it owes. Resumable state of each file (multipart ids, session URIs) lives in
``<root>/.ckptd/journal/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from ..atomic import write_atomic
from ..blobs import blob_files, file_parts
from ..errors import AlreadyExistsError, NotFoundError
from ..storage import Store, join_key
from ..storage.base import run_all
from .commit import checkpoint_dir

log = logging.getLogger("ckptd.upload")


def _run_file(run: str) -> str:
    return run.replace("/", "~")  # '~' is not allowed in run names, so this is reversible


def record_path(root: str, run: str, tag: str) -> str:
    return os.path.join(root, ".ckptd", "uploads", _run_file(run), f"{tag}.json")


def journal_dir(root: str, run: str, tag: str) -> str:
    return os.path.join(root, ".ckptd", "journal", _run_file(run), tag)


def write_record(root: str, run: str, tag: str, store: str) -> None:
    path = record_path(root, run, tag)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, json.dumps({"store": store}).encode())


def clear_record(root: str, run: str, tag: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(record_path(root, run, tag))
    jdir = journal_dir(root, run, tag)
    if os.path.isdir(jdir):
        for name in os.listdir(jdir):
            os.unlink(os.path.join(jdir, name))
        os.rmdir(jdir)


def pending_records(root: str) -> list[tuple[str, str, str]]:
    """Every (run, tag, store) whose upload is owed, as left on disk."""
    base = os.path.join(root, ".ckptd", "uploads")
    out = []
    if not os.path.isdir(base):
        return out
    for run_file in sorted(os.listdir(base)):
        for name in sorted(os.listdir(os.path.join(base, run_file))):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(base, run_file, name)) as f:
                    store = json.load(f)["store"]
            except (OSError, ValueError, KeyError) as e:
                log.warning("unreadable upload record %s/%s: %s", run_file, name, e)
                continue
            out.append((run_file.replace("~", "/"), name[: -len(".json")], store))
    return out


async def upload_checkpoint(
    store: Store,
    root: str,
    run: str,
    tag: str,
    *,
    file_concurrency: int,
    progress: Callable[[int], None],
    with_retries: Callable[..., Any],
    blob_lock: Callable[[str], asyncio.Lock] | None = None,
    skipped: Callable[[int], None] | None = None,
    refs: set[str] | None = None,
) -> None:
    """Upload one committed checkpoint; raises a StorageError subclass when it cannot.

    Never overwrites: if the store already holds a manifest for this tag that is not this
    checkpoint's (another machine's run of the same name), nothing is uploaded and
    ``AlreadyExistsError`` says so; the manifest itself is written create-only.

    A file shared with other checkpoints (``blob``) goes to ``<run>/shared/`` only if the store
    does not hold it yet (``skipped(size)`` counts it otherwise); ``blob_lock(key)`` keeps two
    checkpoints from uploading one blob at once. After the manifest, every blob it lists is
    checked to be there still, and put again if it is not (a ``ckptd gc`` elsewhere raced it).
    ``refs`` gets the blob files the manifest lists before anything is asked of the store (the
    daemon's retention spares them while this upload is pending, e.g. one owed since a restart).
    """
    ck = checkpoint_dir(root, run, tag)
    try:
        with open(os.path.join(ck, "MANIFEST.json"), "rb") as f:
            manifest_bytes = f.read()
    except FileNotFoundError as e:
        raise NotFoundError(f"checkpoint {run}@{tag} is not committed locally") from e
    manifest = json.loads(manifest_bytes)
    if refs is not None:
        refs.update(blob_files([manifest]))
    prefix = join_key(run, "checkpoints", tag)
    manifest_key = join_key(prefix, "MANIFEST.json")
    if await remote_manifest_differs(store, manifest_key, manifest_bytes, with_retries):
        raise AlreadyExistsError(
            f"checkpoint {run}@{tag} already exists in {store.url} (another run of the same "
            "name saved it); it is never overwritten, so this one stays local only"
        )
    jdir = journal_dir(root, run, tag)
    os.makedirs(jdir, exist_ok=True)
    sem = asyncio.Semaphore(file_concurrency)

    async def put(name: str, rec: dict[str, Any]) -> None:
        key = join_key(run, *file_parts(tag, name, rec))
        await with_retries(
            lambda: store.put_file(
                key,
                os.path.join(ck, name),
                size=int(rec["size"]),
                crc32c=int(rec["crc32c"], 16),
                journal=os.path.join(jdir, name + ".json"),
                progress=progress,
            ),
            what=f"upload {run}@{tag}/{name}",
        )

    async def one(name: str, rec: dict[str, Any]) -> None:
        async with sem:
            if rec.get("blob") is None:
                await put(name, rec)
                return
            key = join_key(run, *file_parts(tag, name, rec))
            async with blob_lock(key) if blob_lock is not None else contextlib.nullcontext():
                if await has_object(store, key, int(rec["size"]), with_retries):
                    if skipped is not None:
                        skipped(int(rec["size"]))
                    return
                await put(name, rec)

    # Largest first, so the long pole starts early. A failed file cancels its siblings before
    # anything is retried, so no two uploads of one key (and its journal) ever overlap.
    files = sorted(manifest["files"].items(), key=lambda kv: -int(kv[1]["size"]))
    await run_all([one(n, r) for n, r in files])
    try:
        await with_retries(
            lambda: store.put_bytes(manifest_key, manifest_bytes, if_absent=True),
            what=f"upload {run}@{tag}/MANIFEST.json",
        )
    except AlreadyExistsError:
        # Our own earlier attempt (its reply lost, or a crash after it) is success; anything
        # else means another writer committed the tag meanwhile.
        if await remote_manifest_differs(store, manifest_key, manifest_bytes, with_retries):
            raise
    for name, rec in files:
        if rec.get("blob") is None:
            continue
        key = join_key(run, *file_parts(tag, name, rec))
        if not await has_object(store, key, int(rec["size"]), with_retries):
            log.warning("%s vanished from %s while %s@%s was uploaded (a gc elsewhere?); "
                        "putting it back", key, store.url, run, tag)  # fmt: skip
            await put(name, rec)


async def has_object(store: Store, key: str, size: int, with_retries: Callable[..., Any]) -> bool:
    """Whether the store holds ``key`` with ``size`` bytes (one listing request)."""
    found = await with_retries(lambda: store.list(key), what=f"check {key}")
    return any(o.key == key and o.size == size for o in found)


async def remote_manifest_differs(
    store: Store, key: str, ours: bytes, with_retries: Callable[..., Any]
) -> bool:
    """Whether the store holds a manifest at ``key`` other than ``ours``."""
    try:
        theirs = await with_retries(lambda: store.get_bytes(key), what=f"check {key}")
    except NotFoundError:
        return False
    return bool(theirs != ours)
