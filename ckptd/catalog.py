"""Finding and checking checkpoints in any store, without torch (the daemon and CLI use it).

Readers trust nothing but the manifest: a checkpoint exists iff ``MANIFEST.json`` exists, passes
the schema check (``ckptd.manifest``) and every file it lists has the listed size and CRC32C.
``latest`` is only a hint; when it is missing, stale or names a checkpoint that fails
verification, the newest verifying manifest wins. A bad manifest hides its own checkpoint from
listings (with a warning naming it), never the run; asking for that tag by name fails with an
``IntegrityError`` naming it. In a local store nothing below the run is opened through a
symbolic link, and ``restore`` never follows one in its destination.

A run may live in several places (the daemon's root and the store): ``newest_first`` orders the
checkpoints of all of them, ``open_newest`` reads the first that verifies, falling back to older
ones. Long reads (downloads, checksum passes) draw a ``ckptd.progress`` line on a terminal.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import crc32c

from . import manifest as schema
from .blobs import BLOB_DIR, file_parts
from .errors import (
    ConfigError,
    IntegrityError,
    NotFoundError,
    PermanentStorageError,
    TransientStorageError,
)
from .names import MANIFEST, check_name
from .progress import Progress
from .storage import ProgressFn, Store, is_local, join_key, local_path, open_store
from .storage.local import dir_beneath, is_link_refusal, open_beneath

log = logging.getLogger("ckptd.catalog")
T = TypeVar("T")
_CHUNK = 64 << 20
_MAX_POINTER = 4096  # ``latest`` holds one tag
_SHOW_TAGS = 20
_PARTIAL = ".partial"  # ``ckptd restore`` writes ``.<name>.partial``, then links ``<name>``


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, also when the caller already has a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def split_tag(url: str) -> tuple[str, str]:
    """``URL@TAG`` -> (URL, TAG); no ``@`` (after the last '/') means latest."""
    head, sep, tail = url.rpartition("@")
    if sep and "/" not in tail and tail:
        return head, tail
    return url, "latest"


@dataclass(slots=True)
class Located:
    """A run as a store (``<store>/<run>`` is itself a store URL) and one of its manifests."""

    url: str
    tag: str
    manifest: dict[str, Any]
    directory: str | None = None  # set when the checkpoint is a bare local directory

    def source(self) -> tuple[str, list[str]]:
        """Where its files lie when local: a base directory and the parts below it."""
        if self.directory is not None:
            return self.directory, []
        return local_path(self.url), ["checkpoints", self.tag]

    def parts(self, name: str) -> list[str]:
        """Where the listed file ``name`` lies below the run (the store URL): in
        ``checkpoints/<tag>/``, or in ``shared/`` for data shared with other checkpoints
        (``ckptd.blobs``); in a bare directory, under its own name."""
        if self.directory is not None:
            return [name]
        return file_parts(self.tag, name, self.manifest["files"][name])

    def label(self, name: str) -> str:
        """The listed file as errors name it: where it lies too, when it is shared."""
        parts = self.parts(name)
        return name if parts[0] != BLOB_DIR else f"{name} ({'/'.join(parts)})"

    def local_file(self, name: str) -> tuple[str, list[str]]:
        """A local listed file as (base directory, parts below it), for ``open_listed``."""
        if self.directory is not None:
            return self.directory, [name]
        return local_path(self.url), self.parts(name)


# ---- reading local files without following links -------------------------------------------------


@contextlib.contextmanager
def open_listed(
    base: str, parts: Sequence[str], rec: dict[str, Any], label: str | None = None
) -> Iterator[BinaryIO]:
    """Open a file a manifest lists, ``base/parts...``, checked to be a regular file of the listed
    size and never reached through a symbolic link; errors name the file (``label``, else its
    last part)."""
    name = label or parts[-1]
    try:
        # O_NONBLOCK: a FIFO planted under a listed name must fail the check, not hang the open.
        fd = open_beneath(base, parts, os.O_RDONLY | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise IntegrityError(f"{name}: listed in the manifest but missing") from e
    except OSError as e:
        raise _os_error(name, e) from e
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"{name}: not a regular file")
        if st.st_size != rec["size"]:
            raise IntegrityError(f"{name}: {st.st_size} bytes on disk, manifest says {rec['size']}")
        yield f  # type: ignore[misc]  # a buffering=0 file is a RawIOBase, which reads as bytes


def _os_error(name: str, e: OSError) -> Exception:
    if is_link_refusal(e):
        return IntegrityError(f"{name}: reached through a symbolic link, which is never followed")
    if isinstance(e, PermissionError):
        return PermanentStorageError(f"{name}: {e}")
    return TransientStorageError(f"{name}: {e}")


def _read_small(base: str, parts: Sequence[str], limit: int) -> bytes:
    fd = open_beneath(base, parts, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IntegrityError(f"{os.path.join(base, *parts)} is not a regular file")
        return f.read(limit + 1)


def checkpoint_directory(url: str) -> tuple[str, dict[str, Any]] | None:
    """A local directory holding a MANIFEST.json (a checkpoint, wherever it was copied to)."""
    if not is_local(url):
        return None
    path = local_path(url)
    try:
        raw = _read_small(path, [MANIFEST], schema.MAX_MANIFEST_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise _os_error(f"{path}/{MANIFEST}", e) from e
    # Its own directory name says nothing about its tag (``ckptd restore`` picks any name).
    return path, schema.parse(raw, tag=None, where=path)


def normalize_url(url: str) -> tuple[str, str | None]:
    """Accept a run URL, or a local checkpoint directory (then its tag is implied)."""
    if is_local(url):
        path = local_path(url)
        if os.path.isfile(os.path.join(path, MANIFEST)):
            return os.path.dirname(os.path.dirname(path)), os.path.basename(path)
        return path, None
    return url.rstrip("/"), None


# ---- manifests in a store --------------------------------------------------------------------------


async def _read_manifest(store: Store, tag: str) -> dict[str, Any]:
    """The validated manifest of ``tag``: ``ConfigError`` for a bad tag name, ``NotFoundError``
    when absent, ``IntegrityError`` naming the checkpoint when it fails the schema."""
    check_name(tag, "tag")
    raw = await store.get_bytes(
        join_key("checkpoints", tag, MANIFEST), start=0, end=schema.MAX_MANIFEST_BYTES + 1
    )
    return schema.parse(raw, tag=tag, where=f"{store.url}@{tag}")


async def _list_tags(store: Store) -> list[str]:
    """Tags that have a ``MANIFEST.json`` object, sorted; names the rule refuses are skipped."""
    tags = []
    for o in await store.list("checkpoints/"):
        parts = o.key.split("/")
        if len(parts) != 3 or parts[2] != MANIFEST:
            continue
        try:
            tags.append(check_name(parts[1], "tag"))
        except ConfigError:
            log.warning("skipping %s/checkpoints/%r: not a valid tag", store.url, parts[1])
    return sorted(tags)


async def list_manifests(store: Store) -> list[dict[str, Any]]:
    """Every valid manifest of the run, oldest first; a bad one is skipped with a warning."""
    out = []
    for tag in await _list_tags(store):
        try:
            out.append(await _read_manifest(store, tag))
        except (IntegrityError, NotFoundError) as e:  # torn, hostile, or deleted meanwhile
            log.warning("skipping checkpoint %s@%s: %s", store.url, tag, e)
    return sorted(out, key=lambda m: (m["step"], str(m.get("created", ""))))


async def _missing(store: Store, tag: str) -> NotFoundError:
    """The error for an absent tag, listing the tags that exist."""
    tags = await _list_tags(store)
    if not tags:
        return NotFoundError(f"no checkpoint {tag!r} in {store.url}: it has no checkpoints")
    shown = ", ".join(tags[-_SHOW_TAGS:])
    more = f" (and {len(tags) - _SHOW_TAGS} older)" if len(tags) > _SHOW_TAGS else ""
    return NotFoundError(f"no checkpoint {tag!r} in {store.url}; it has: {shown}{more}")


async def candidates(store: Store, tag: str) -> list[dict[str, Any]]:
    """Manifests to try, best first: the named tag; or for latest, the pointer then newest first."""
    if tag != "latest":
        try:
            return [await _read_manifest(store, tag)]
        except NotFoundError:
            raise await _missing(store, tag) from None
    manifests = await list_manifests(store)
    if not manifests:
        return []
    try:
        hint = (await store.get_bytes("latest", start=0, end=_MAX_POINTER)).decode().strip()
    except (NotFoundError, UnicodeDecodeError):
        hint = ""
    ordered = list(reversed(manifests))
    newest = ordered[0]
    for m in ordered:
        if m["tag"] == hint and m["step"] >= newest["step"]:
            ordered.remove(m)
            ordered.insert(0, m)
            break
    return ordered


def list_checkpoints(url: str) -> list[dict[str, Any]]:
    """Manifests of every committed checkpoint of the run at ``url``, oldest first."""
    base, _ = normalize_url(url)

    async def go() -> list[dict[str, Any]]:
        async with open_store(base) as store:
            return await list_manifests(store)

    return run_sync(go())


def list_runs(url: str) -> list[str]:
    """Runs under a store URL: every prefix that has ``checkpoints/<tag>/MANIFEST.json``."""

    async def go() -> list[str]:
        async with open_store(url) as store:
            objs = await store.list("")
        runs = set()
        for o in objs:
            parts = o.key.split("/")
            if len(parts) >= 4 and parts[-1] == MANIFEST and parts[-3] == "checkpoints":
                runs.add("/".join(parts[:-3]))
        valid = []
        for run in sorted(runs):
            try:
                valid.append(check_name(run, "run"))
            except ConfigError:
                log.warning("skipping %s/%r: not a valid run name", url, run)
        return valid

    return run_sync(go())


# ---- verify and restore ----------------------------------------------------------------------------


def _in_location(url: str, tag: str) -> list[Located]:
    """The checkpoints ``url``@``tag`` may name, best first: a bare directory is its own one; a
    run gives its ``candidates`` (for latest: the pointer, then newest first)."""
    if (direct := checkpoint_directory(url)) is not None:
        path, manifest = direct
        return [Located(path, manifest["tag"], manifest, directory=path)]
    base, implied = normalize_url(url)
    if implied is not None and tag == "latest":
        tag = implied

    async def go() -> list[dict[str, Any]]:
        async with open_store(base) as store:
            return await candidates(store, tag)

    return [Located(base, m["tag"], m) for m in run_sync(go())]


def newest_first(urls: Sequence[str], tag: str = "latest") -> list[Located]:
    """The checkpoints ``tag`` names over all of ``urls`` (the daemon's root, then the store),
    best first, without reading their data.

    For latest: by step, highest first, the earlier URL first at equal steps (the root is local:
    nothing to download), each location's own order kept within a step. A fresh machine's root
    may hold older saves than the store, so the first location that has any is not enough. For a
    named tag: its copy in each location that has one, in the order of ``urls``.

    ``[]``: no location has a checkpoint. A named tag that no location has raises
    ``NotFoundError`` (listing what each has); one whose manifest is bad wherever it is,
    ``IntegrityError``. Storage errors propagate: a store that cannot be read is not one that has
    nothing, and resuming from an older checkpoint than it holds would lose training.
    """
    found: list[tuple[tuple[int, int, int], Located]] = []
    missing: list[str] = []
    bad: list[str] = []
    for rank, url in enumerate(urls):
        try:
            located = _in_location(url, tag)
        except NotFoundError as e:  # only a named tag: for latest an empty run gives []
            missing.append(str(e))
            continue
        except IntegrityError as e:  # a named tag whose manifest fails the schema here
            bad.append(str(e))
            continue
        for i, loc in enumerate(located):
            step = loc.manifest.get("step")
            newer = -step if tag == "latest" and isinstance(step, int) else 0
            found.append(((newer, rank, i), loc))
    if bad and found:
        log.warning("skipping a bad copy of %s: %s", tag, "; ".join(bad))
    elif bad:
        raise IntegrityError("; ".join(bad))
    if not found and missing:
        raise NotFoundError("; ".join(missing))
    return [loc for _, loc in sorted(found, key=lambda f: f[0])]


def open_newest(
    urls: Sequence[str],
    tag: str,
    read: Callable[[Located], T],
    *,
    fall_back: bool = True,
) -> tuple[Located, T] | None:
    """``read`` the best of ``newest_first(urls, tag)`` that verifies: the one resume rule.

    ``read`` raises ``IntegrityError`` for a checkpoint that does not verify; with ``fall_back``
    the next best is tried (logged), else that error is raised. None: there is no checkpoint at
    all. When some exist and none verifies, ``IntegrityError``: a fresh start would lose them.
    """
    cands = newest_first(urls, tag)
    if not cands:
        return None
    first_error: str | None = None
    for loc in cands if fall_back else cands[:1]:
        where = f"{loc.url}@{loc.tag}"
        try:
            value = read(loc)
        except IntegrityError as e:
            if not fall_back:
                raise IntegrityError(f"{where}: {e}") from e
            log.warning("checkpoint %s does not verify (%s); trying the next newest", where, e)
            first_error = first_error or f"{where}: {e}"
            continue
        if first_error is not None:
            log.warning("using %s, the newest checkpoint that verifies", where)
        return loc, value
    raise IntegrityError(
        f"no checkpoint in {' or '.join(urls)} verifies; the newest fails: {first_error}"
    )


def locate_newest(urls: Sequence[str], tag: str = "latest") -> Located | None:
    """The newest checkpoint over ``urls`` whose files all verify (see ``open_newest``)."""
    found = open_newest(urls, tag, _check_located)
    return None if found is None else found[0]


def _locate(url: str, tag: str) -> Located:
    """The checkpoint ``url``@``tag`` names: a bare directory, or the best candidate of a run."""
    cands = newest_first([url], tag)
    if not cands:
        raise NotFoundError(f"no complete checkpoint in {normalize_url(url)[0]}")
    return cands[0]


def _total(manifest: dict[str, Any]) -> int:
    return sum(int(rec["size"]) for rec in manifest["files"].values())


def verify(url: str, tag: str = "latest") -> Located:
    """Check every file of a checkpoint against its manifest; raises ``IntegrityError``."""
    return _check_located(_locate(url, tag))


def _check_located(loc: Located) -> Located:
    """Verify ``loc``'s files (streamed from the store when remote); errors name the checkpoint."""
    if loc.directory is None and not is_local(loc.url):
        from .readinto import verify_store_copy  # it reads through this module's open_listed

        try:
            with Progress(_total(loc.manifest), f"verify {loc.url}@{loc.tag}") as p:
                verify_store_copy(loc, p)
        except IntegrityError as e:
            raise IntegrityError(f"{loc.url}@{loc.tag}: {e}") from e
        return loc
    try:
        with Progress(_total(loc.manifest), f"verify {loc.url}@{loc.tag}") as p:
            for name, rec in loc.manifest["files"].items():
                _check_file(*loc.local_file(name), rec, p, loc.label(name))
    except IntegrityError as e:
        raise IntegrityError(f"{loc.url}@{loc.tag}: {e}") from e
    return loc


def _check_file(
    base: str,
    parts: list[str],
    rec: dict[str, Any],
    progress: ProgressFn | None = None,
    label: str | None = None,
) -> None:
    """Read one listed file, checking size and CRC32C; errors name it (``label``)."""
    name = label or parts[-1]
    value = 0
    with open_listed(base, parts, rec, name) as f:
        while chunk := f.read(_CHUNK):
            value = crc32c.crc32c(chunk, value)
            if progress is not None:
                progress(len(chunk))
    if f"{value:08x}" != rec["crc32c"].lower():
        raise IntegrityError(
            f"{name}: CRC32C {value:08x} does not match the manifest's {rec['crc32c']}"
        )


def check_dest(dest: str) -> None:
    """``ckptd restore`` writes only into a new or empty directory: refuse anything else."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"destination {dest} exists and is not a directory")
    if os.listdir(dest):
        raise ConfigError(f"destination {dest} is not empty; restore into a new or empty directory")


def copy_checkpoint(url: str, tag: str, dest: str) -> Located:
    """Copy a verified checkpoint (files + MANIFEST.json) into ``dest``, a new or empty local
    directory, each file streamed straight to its place (``readinto.copy_files``: concurrent
    ranged reads from a store, or large reads of a local copy, CRC32C checked on the fly, no
    temporary copy). Every file is written as ``.<name>.partial``, created exclusively
    (``O_EXCL|O_NOFOLLOW``), and linked to its name only once it has verified and is on disk;
    nothing that appears in ``dest`` meanwhile, link or file, is followed or overwritten. The
    manifest is written last, so an interrupted restore leaves no directory that looks like a
    checkpoint, and a failed one removes what it created. Files shared with other checkpoints
    (``ckptd.blobs``) are written under their listed names: ``dest`` is self-contained.

    For latest, a checkpoint that fails verification (a corrupt shared file fails every
    checkpoint that lists it) is removed again and the next newest is tried."""
    check_dest(dest)
    cands = newest_first([url], tag)
    if not cands:
        raise NotFoundError(f"no complete checkpoint in {normalize_url(url)[0]}")
    first: IntegrityError | None = None
    for i, loc in enumerate(cands):
        try:
            _copy_one(loc, dest)
        except IntegrityError as e:
            if tag != "latest" or i + 1 == len(cands):
                if first is not None:
                    raise IntegrityError(
                        f"no checkpoint of {normalize_url(url)[0]} verifies; the newest fails: "
                        f"{first}"
                    ) from e
                raise
            first = first or e
            log.warning("%s; restoring the next newest checkpoint instead", e)
            continue
        return loc
    raise AssertionError("unreachable")  # the loop returns or raises


def _copy_one(loc: Located, dest: str) -> None:
    from .readinto import Source, copy_files  # it reads through this module's open_listed

    label = f"restore {loc.url}@{loc.tag}"
    with _dest_dir(dest) as d, Progress(_total(loc.manifest), label) as progress:
        created: list[str] = []  # names this restore created itself, exclusively

        @contextlib.asynccontextmanager
        async def opened(name: str) -> AsyncIterator[int]:
            partial = f".{name}{_PARTIAL}"
            out = _create(d, partial, dest)
            created.append(partial)
            try:
                yield out
                await asyncio.to_thread(os.fsync, out)
            finally:
                os.close(out)
            _publish(d, partial, name, dest)
            created.append(name)

        async def go() -> None:
            src = Source.of(loc)
            try:
                await copy_files(src, list(loc.manifest["files"]), opened, progress)
            finally:
                await src.close()

        try:
            try:
                run_sync(go())
            except IntegrityError as e:
                raise IntegrityError(f"{loc.url}@{loc.tag}: {e}") from e
            out = _create(d, MANIFEST, dest)
            created.append(MANIFEST)
            try:
                os.write(out, json.dumps(loc.manifest, indent=1).encode())
                os.fsync(out)
            finally:
                os.close(out)
        except BaseException:
            for name in created:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=d)
            raise
        os.fsync(d)


def _publish(d: int, partial: str, name: str, dest: str) -> None:
    """Give a verified ``partial`` its listed ``name`` without replacing anything there: a hard
    link fails if ``name`` exists (``rename`` would overwrite it), then the partial name goes."""
    try:
        os.link(partial, name, src_dir_fd=d, dst_dir_fd=d, follow_symlinks=False)
    except FileExistsError as e:
        raise ConfigError(f"{dest}/{name} appeared during the restore; nothing overwritten") from e
    except OSError as e:
        raise _os_error(f"{dest}/{name}", e) from e
    os.unlink(partial, dir_fd=d)


@contextlib.contextmanager
def _dest_dir(dest: str) -> Iterator[int]:
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(dest)
    with dir_beneath(parent, [os.path.basename(os.path.abspath(dest))]) as d:
        if os.listdir(d):
            raise ConfigError(f"destination {dest} is not empty; restore into a new directory")
        yield d


def _create(d: int, name: str, dest: str) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, 0o644, dir_fd=d)
    except FileExistsError as e:
        raise ConfigError(f"{dest}/{name} appeared during the restore; nothing overwritten") from e
