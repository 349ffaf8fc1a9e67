"""Local commit: write a staged save into ``<tag>.partial/``, fsync, rename, MANIFEST last.

Runs in worker threads (every call here blocks). Checksums are computed by a second thread while
the first writes, over the same shared-memory bytes, so hashing costs no wall time; the disk is
told to start writing each chunk as soon as it is in the page cache, so the fsyncs wait only for
the tail.

Commit order, each step durable before the next:
  1. ``<run>/checkpoints/<tag>.partial/<file>``: header + arena bytes, CRC32C alongside; every
     file written, then every file fsynced
  2. fsync the partial directory, rename it to ``<tag>/``, fsync ``checkpoints/``
  3. ``<tag>/MANIFEST.json`` (temp + fsync + rename): the commit marker
  4. ``<run>/latest`` (temp + fsync + rename), only if this is the newest step
A reader trusts a checkpoint only through its manifest, so a crash anywhere leaves either a
complete checkpoint or a directory the next start removes.

Incremental checkpoints (``ckptd.blobs``): a file the client marked is hashed (BLAKE3) before
step 1; if the run's ``shared/`` holds those bytes, the file is a hard link to that blob, not a
write. A marked file that is written is hashed while it is written (the same bytes the CRC
covers) and hard-linked into ``shared/`` after its fsync and before the manifest, so no manifest
ever lists a blob that is not on disk.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import crc32c

from ..atomic import fsync_dir, temp_name, write_atomic
from ..blobs import blob_file, hasher
from ..errors import SaveError
from .blobstore import Dedup, LocalBlobs, hash_file, hash_staged, read_head
from .lease import BytesSource, Source

_WRITE_CHUNK = 8 << 20  # write + start writeback
_HASHERS = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="ckptd-crc")


@dataclass(slots=True)
class StagedFile:
    name: str
    header: bytes
    offset: int  # in the slot
    size: int  # data section bytes
    segments: list[tuple[int, int]] | None = None
    """(offset, size) pieces of the slot, in file order, when the data section is not one run:
    a DCP rank writes a subset of what it staged, and gathering beats a second copy."""
    dedup: bool = False
    """The client expects these bytes to be stored already (frozen, or unchanged since its last
    save): hash first, and link the run's blob instead of writing when there is one."""
    blob: str | None = None
    """Not staged at all: the client proved the file unchanged, and names the run's blob."""

    def pieces(self) -> list[tuple[int, int]]:
        if self.segments is None:
            return [(self.offset, self.size)]
        return list(self.segments)


def crc_hex(value: int) -> str:
    return f"{value:08x}"


def write_file(
    path: str,
    header: bytes,
    source: Source,
    pieces: list[tuple[int, int]],
    progress: Callable[[int], None],
) -> int:
    """Write header + the source's pieces, in order, to ``path`` and fsync; returns the CRC32C
    of the whole file."""
    fd, crc = _write_unsynced(path, header, source, pieces, progress)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return crc


def _chunks(pieces: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    for offset, size in pieces:
        for pos in range(0, size, _WRITE_CHUNK):
            yield offset + pos, min(_WRITE_CHUNK, size - pos)


def _fill(source: Source, buf: bytearray, offset: int, n: int, crc: int, digest: Any) -> int:
    view = memoryview(buf)[:n]
    try:
        source.read_into(offset, view)
        if digest is not None:
            digest.update(view)
        return crc32c.crc32c(view, crc)  # type: ignore[no-any-return]
    finally:
        view.release()


def _write_unsynced(
    path: str,
    header: bytes,
    source: Source,
    pieces: list[tuple[int, int]],
    progress: Callable[[int], None],
    digest: Any = None,
) -> tuple[int, int]:
    """Create ``path`` and write header + data, with the disk already writing behind; returns
    (the open fd, which the caller must fsync and close; the CRC32C of the file). ``digest``,
    a content hasher, is fed the same bytes in order.

    Each chunk is copied out of the source into one of two buffers of the daemon's own and
    checksummed there by a helper thread while the other buffer is being written, so the bytes
    checksummed are exactly the bytes written, whatever the client does to its memory meanwhile.
    Each chunk's writeback starts as soon as it is written (``sync_file_range``), so the final
    fsync only waits for the tail.
    """
    crc = crc32c.crc32c(header)
    if digest is not None:
        digest.update(header)
    chunks = _chunks(pieces)
    first = next(chunks, None)
    biggest = min(_WRITE_CHUNK, max((n for _, n in pieces), default=0))
    bufs = [bytearray(biggest), bytearray(biggest)] if first else []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
    pending: concurrent.futures.Future[int] | None = None
    try:
        at = _write_all(fd, memoryview(header))
        if first is not None:
            pending = _HASHERS.submit(_fill, source, bufs[0], first[0], first[1], crc, digest)
        current, i = first, 0
        while current is not None and pending is not None:
            crc = pending.result()
            pending = None
            nxt = next(chunks, None)
            if nxt is not None:  # read the next chunk while this one is written
                pending = _HASHERS.submit(
                    _fill, source, bufs[(i + 1) % 2], nxt[0], nxt[1], crc, digest
                )
            n = _write_all(fd, memoryview(bufs[i % 2])[: current[1]])
            _start_writeback(fd, at, n)
            at += n
            progress(n)
            current, i = nxt, i + 1
    except BaseException:
        if pending is not None:
            concurrent.futures.wait([pending])
        os.close(fd)
        raise
    return fd, crc


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing this range to disk now, without waiting for it.
    A hint: where it is missing or fails, the fsync that follows does all the work."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _write_all(fd: int, view: memoryview) -> int:
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])
    return done


def checkpoint_dir(root: str, run: str, tag: str) -> str:
    return os.path.join(root, run, "checkpoints", tag)


def _refuse_existing(root: str, run: str, tag: str) -> None:
    if os.path.exists(os.path.join(checkpoint_dir(root, run, tag), "MANIFEST.json")):
        raise SaveError(f"checkpoint {run}@{tag} already exists; tags are never overwritten")


def _fresh_partial(root: str, run: str, tag: str) -> str:
    """An empty ``<tag>.partial`` to fill, once it is sure the tag is not committed yet."""
    _refuse_existing(root, run, tag)
    final = checkpoint_dir(root, run, tag)
    partial = final + ".partial"
    if os.path.exists(partial):
        shutil.rmtree(partial)
    if os.path.isdir(final):  # a directory left without its manifest by a crash
        shutil.rmtree(final)
    os.makedirs(partial)
    return partial


def write_staged(
    root: str,
    run: str,
    tag: str,
    files: list[StagedFile],
    inline: dict[str, bytes],
    slot: Source,
    progress: Callable[[int], None],
    dedup: Dedup | None = None,
) -> tuple[str, dict[str, dict[str, Any]]]:
    """Step 1: every data file into ``<tag>.partial``. Returns (partial dir, file records).
    On any error the partial directory is removed.

    With ``dedup``, a file the client marked is hashed first and, when the run holds a blob of
    those bytes, hard-linked from it instead of written; written ones become blobs. A file the
    client did not stage (``blob``) must be a blob here already."""
    partial = _fresh_partial(root, run, tag)
    records: dict[str, dict[str, Any]] = {}
    fds: list[int] = []
    new_blobs: list[tuple[StagedFile, str, int, Any]] = []
    try:
        # Every file is written before any is fsynced: one file's writeback overlaps the next
        # file's copy, and the fsyncs at the end mostly find their data on disk already.
        for f in files:
            path = os.path.join(partial, f.name)
            size = len(f.header) + f.size
            if dedup is not None and (f.blob is not None or f.dedup):
                linked = _link_blob(dedup, f, slot, path)
                if linked is not None:
                    records[f.name] = {"size": size, "crc32c": crc_hex(linked[1]),
                                       "blob": linked[0]}  # fmt: skip
                    dedup.deduped += size
                    continue
            digest = hasher() if dedup is not None and f.dedup else None
            fd, crc = _write_unsynced(path, f.header, slot, f.pieces(), progress, digest)
            fds.append(fd)
            records[f.name] = {"size": size, "crc32c": crc_hex(crc)}
            if dedup is not None:
                dedup.new_bytes += size
            if digest is not None:
                new_blobs.append((f, path, crc, digest))
        for name, data in inline.items():
            fd, crc = _write_unsynced(
                os.path.join(partial, name), b"", BytesSource(data), [(0, len(data))], progress
            )
            fds.append(fd)
            records[name] = {"size": len(data), "crc32c": crc_hex(crc)}
            if dedup is not None:
                dedup.new_bytes += len(data)
        for fd in fds:
            os.fsync(fd)
        for f, path, crc, digest in new_blobs:
            assert dedup is not None
            value = str(digest.hexdigest())
            dedup.refs.add(blob_file(f.name, value))
            blob = dedup.blobs.adopt(run, f.name, value, path, crc)
            if os.stat(blob).st_ino != os.stat(path).st_ino:  # another save adopted it first
                os.unlink(path)
                os.link(blob, path, follow_symlinks=False)
            records[f.name]["blob"] = value
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        for fd in fds:
            os.close(fd)
    return partial, records


def _link_blob(dedup: Dedup, f: StagedFile, slot: Source, path: str) -> tuple[str, int] | None:
    """Link the run's blob of ``f``'s bytes to ``path``: (digest, CRC32C), or None when the
    file must be written (no such blob). A reference to a blob that is gone fails the save."""
    size = len(f.header) + f.size
    digest = f.blob if f.blob is not None else hash_staged(f.header, slot, f.pieces())
    dedup.refs.add(blob_file(f.name, digest))  # before the lookup: retention keeps it now
    found = dedup.blobs.lookup(dedup.run, f.name, digest, size)
    if found is None or (f.blob is not None and read_head(found[0], len(f.header)) != f.header):
        if f.blob is None:
            return None
        raise SaveError(
            f"{f.name}: the unchanged data this save refers to (blob {digest[:12]}) is no "
            "longer in the daemon's root; the next save stages it again"
        )
    try:
        os.link(found[0], path, follow_symlinks=False)
    except FileNotFoundError:  # removed between the lookup and the link (retention)
        if f.blob is not None:
            raise SaveError(f"{f.name}: blob {digest[:12]} was removed during this save") from None
        return None
    return digest, found[1]


def parts_dir(root: str, run: str, tag: str) -> str:
    """Where this daemon keeps its ranks' parts of a sharded checkpoint until it is committed:
    inside the state directory, so no listing ever shows them."""
    return os.path.join(root, ".ckptd", "parts", run.replace("/", "~"), tag)


def write_part(
    root: str, run: str, tag: str, f: StagedFile, slot: Source, progress: Callable[[int], None]
) -> tuple[str, dict[str, Any]]:
    """One rank's file of a sharded checkpoint: temp name, fsync, rename. Returns (path, record);
    the record names the part's content digest (``blob``): a rank whose shard did not change
    since the last checkpoint then uploads nothing for it."""
    _refuse_existing(root, run, tag)
    directory = parts_dir(root, run, tag)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f.name)
    tmp = temp_name(path)
    digest = hasher()
    try:
        fd, crc = _write_unsynced(tmp, f.header, slot, f.pieces(), progress, digest)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
    size = len(f.header) + f.size
    return path, {"size": size, "crc32c": crc_hex(crc), "blob": str(digest.hexdigest())}


def assemble_parts(
    root: str,
    run: str,
    tag: str,
    parts: dict[str, dict[str, Any]],
    inline: dict[str, bytes],
    blobs: LocalBlobs | None = None,
) -> tuple[str, dict[str, dict[str, Any]]]:
    """Gather every rank's part (all on this daemon) into ``<tag>.partial`` for ``commit``.

    Each part must be here with the size its rank reported; a part that is elsewhere (another
    node's daemon) cannot be committed to this root, and nothing is moved in that case. A part
    with a content digest becomes (or is linked from) the run's blob of that digest.
    """
    src = parts_dir(root, run, tag)
    for name, rec in parts.items():
        path = os.path.join(src, name)
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise SaveError(
                f"part {name} of {run}@{tag} is not on this daemon: ranks on several nodes "
                "need a shared store (Writer(store=...) or ckptd serve --store)"
            ) from None
        if size != int(rec["size"]):
            raise SaveError(
                f"part {name} of {run}@{tag} has {size} bytes, its rank wrote {rec['size']}"
            )
    partial = _fresh_partial(root, run, tag)
    records = {name: dict(rec) for name, rec in parts.items()}
    for name, rec in parts.items():
        dest = os.path.join(partial, name)
        os.rename(os.path.join(src, name), dest)
        digest = rec.get("blob")
        if blobs is None or digest is None:
            continue
        found = blobs.lookup(run, name, digest, int(rec["size"]))
        if found is not None and found[1] == int(rec["crc32c"], 16):
            os.unlink(dest)  # the same bytes are stored already: keep one copy
            os.link(found[0], dest, follow_symlinks=False)
            continue
        if hash_file(dest)[0] != digest:  # the digest came with the commit: check it
            raise SaveError(f"part {name} of {run}@{tag} does not have the digest its rank sent")
        blobs.adopt(run, name, digest, dest, int(rec["crc32c"], 16))
    for name, data in inline.items():
        crc = write_file(
            os.path.join(partial, name), b"", BytesSource(data), [(0, len(data))], lambda n: None
        )
        records[name] = {"size": len(data), "crc32c": crc_hex(crc)}
    shutil.rmtree(src, ignore_errors=True)
    return partial, records


def commit(partial: str, manifest: dict[str, Any]) -> str:
    """Steps 2-3: rename the partial directory into place and write the manifest last."""
    final = partial[: -len(".partial")]
    try:
        fsync_dir(partial)
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        fsync_dir(os.path.dirname(final))
        write_atomic(os.path.join(final, "MANIFEST.json"), json.dumps(manifest, indent=1).encode())
    except BaseException:  # e.g. the disk filled: leave nothing that looks like a checkpoint
        shutil.rmtree(final, ignore_errors=True)
        raise
    return final


def update_latest(root: str, run: str, tag: str) -> None:
    """Step 4: ``<run>/latest`` names the newest tag. A hint: readers fall back to manifests."""
    write_atomic(os.path.join(root, run, "latest"), (tag + "\n").encode())
