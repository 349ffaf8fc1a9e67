"""The mirror against a hostile experiment folder (issue 14): only regular files inside it go up.

Real files in a tmp dir, the in-memory store, the mirror in-process; one test runs the real
daemon. Every wait is bounded (``asyncio.wait_for``), so a regression fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from ckptd.daemon.mirror import Mirror
from ckptd.errors import PermanentStorageError, TransientStorageError
from ckptd.storage.base import ProgressFn
from ckptd.storage.memory import MemoryStore

PREFIX = "p/n/ts/experiment"
BOUND_S = 20.0
"""Longest any single wait may take; far above what a healthy mirror needs."""


class GuardStore(MemoryStore):
    """A memory store that refuses (and records) any request to read a non-regular file.

    The refusal keeps the old, unsafe code from reading ``/dev/zero`` into memory forever; the
    record is what the tests assert on.
    """

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.nonregular: list[str] = []
        self.fail_keys: set[str] = set()
        self.calls = 0

    async def put_file(
        self,
        key: str,
        path: str,
        *,
        size: int,
        crc32c: int,
        journal: str | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        self.calls += 1
        if not stat.S_ISREG(os.stat(path).st_mode):
            self.nonregular.append(key)
            raise PermanentStorageError(f"test guard: {path} is not a regular file")
        if key in self.fail_keys:
            raise PermanentStorageError("test guard: failing this one on purpose")
        await super().put_file(key, path, size=size, crc32c=crc32c)

    def rels(self) -> set[str]:
        return {k[len(PREFIX) + 1 :] for k in self._objects if k.startswith(PREFIX + "/")}

    def value(self, rel: str) -> bytes | None:
        return self._objects.get(f"{PREFIX}/{rel}")


class HangingStore(GuardStore):
    """Every upload hangs: a store that never answers.

    ``deaf`` also swallows cancellation (an SDK retry loop that eats ``CancelledError``) until
    ``release`` is set, so only a caller that does not wait for cancelled work can go on.
    """

    def __init__(self, url: str, *, deaf: bool = False) -> None:
        super().__init__(url)
        self.deaf = deaf
        self.release = asyncio.Event()

    async def put_file(self, key: str, path: str, **kw: object) -> None:  # type: ignore[override]
        self.calls += 1
        while True:
            try:
                await self.release.wait()
                return
            except asyncio.CancelledError:
                if not self.deaf or self.release.is_set():
                    raise


@pytest.fixture
def store() -> Iterator[GuardStore]:
    s = GuardStore(f"memory://hostile-{uuid.uuid4().hex}")
    yield s
    MemoryStore.clear(s.name)


@pytest.fixture
def exp(tmp_path) -> str:  # type: ignore[no-untyped-def]
    d = tmp_path / "exp"
    d.mkdir()
    return str(d)


@pytest.fixture
def outside(tmp_path) -> str:  # type: ignore[no-untyped-def]
    """A folder beside the experiment holding a secret that must never reach the store."""
    d = tmp_path / "outside"
    d.mkdir()
    with open(d / "credentials", "wb") as f:
        f.write(b"SECRET-KEY")
    return str(d)


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@contextlib.asynccontextmanager
async def _mirror(directory: str, store: GuardStore, **kw: object) -> AsyncIterator[Mirror]:
    m = Mirror(directory, store, PREFIX, quiet_s=0.05, **kw)  # type: ignore[arg-type]
    await asyncio.wait_for(m.start(), BOUND_S)
    try:
        yield m
    finally:
        await asyncio.wait_for(m.stop(timeout=5), BOUND_S)


async def _flush(m: Mirror) -> bool:
    return await asyncio.wait_for(m.flush(timeout=BOUND_S / 2), BOUND_S)


def _warnings(caplog: pytest.LogCaptureFixture, needle: str) -> int:
    return sum(
        1 for r in caplog.records if r.levelno >= logging.WARNING and needle in r.getMessage()
    )


def _no_secret(store: GuardStore) -> None:
    assert not any(b"SECRET-KEY" in v for v in store._objects.values())


async def _until_keys(store: GuardStore, want: set[str]) -> None:
    deadline = time.monotonic() + BOUND_S
    while not want <= store.rels():
        assert time.monotonic() < deadline, f"never uploaded: {want - store.rels()}"
        await asyncio.sleep(0.02)


async def test_symlink_to_a_file_outside_is_not_uploaded(
    exp: str, outside: str, store: GuardStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "ckptd.mirror")
    _write(os.path.join(exp, "ok.txt"), b"fine")
    os.symlink(os.path.join(outside, "credentials"), os.path.join(exp, "creds"))
    async with _mirror(exp, store) as m:
        assert await _flush(m)
        os.symlink(os.path.join(outside, "credentials"), os.path.join(exp, "late-creds"))
        _write(os.path.join(exp, "after.txt"), b"x")  # the watcher's events, then a flush
        await _until_keys(store, {"after.txt"})
        assert await _flush(m)
        assert await _flush(m)  # each flush sees the links again: still one warning each
        assert store.rels() == {"ok.txt", "after.txt"}
        assert {"creds", "late-creds"} <= set(m.skipped)
    _no_secret(store)
    assert _warnings(caplog, "'creds'") == 1
    assert _warnings(caplog, "'late-creds'") == 1


async def test_symlinked_directory_is_not_followed(
    exp: str, outside: str, store: GuardStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Also when a folder is swapped for a link after its file was queued (the retry path)."""
    caplog.set_level(logging.WARNING, "ckptd.mirror")
    _write(os.path.join(exp, "results", "credentials"), b"public")
    os.symlink(outside, os.path.join(exp, "linked"))
    store.fail_keys = {f"{PREFIX}/results/credentials"}  # it stays queued for the next flush
    async with _mirror(exp, store, attempts=1) as m:
        assert not await _flush(m)
        assert "results/credentials" in m.failed
        store.fail_keys.clear()
        os.rename(os.path.join(exp, "results"), os.path.join(exp, "results.old"))
        os.symlink(outside, os.path.join(exp, "results"))
        os.symlink(outside, os.path.join(exp, "late-linked"))
        ok = await _flush(m)
        _no_secret(store)  # the queued retry of results/credentials must not go through the link
        assert not any(k.startswith(("linked/", "late-linked/", "results/")) for k in store.rels())
        assert ok
        await _until_keys(store, {"results.old/credentials"})
        assert store.value("results.old/credentials") == b"public"
        assert {"linked", "late-linked", "results"} <= set(m.skipped)


async def test_fifo_is_skipped_and_never_blocks(
    exp: str, store: GuardStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "ckptd.mirror")
    fifos = [os.path.join(exp, "pipe"), os.path.join(exp, "sub", "late-pipe")]
    _write(os.path.join(exp, "ok.txt"), b"fine")
    os.mkfifo(fifos[0])
    try:
        async with _mirror(exp, store) as m:
            assert await _flush(m)
            os.makedirs(os.path.dirname(fifos[1]))
            os.mkfifo(fifos[1])
            _write(os.path.join(exp, "sub", "after.txt"), b"x")
            await _until_keys(store, {"sub/after.txt"})
            assert await _flush(m)
            assert store.rels() == {"ok.txt", "sub/after.txt"}
            assert {"pipe", "sub/late-pipe"} <= set(m.skipped)
        assert _warnings(caplog, "'pipe'") == 1
    finally:
        for fifo in fifos:  # a reader stuck in open() (the old code) is let go, not leaked
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


async def test_link_to_dev_zero_is_never_read(
    exp: str, store: GuardStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "ckptd.mirror")
    os.symlink("/dev/zero", os.path.join(exp, "zeros.bin"))
    os.symlink("/dev/null", os.path.join(exp, "null.log"))
    _write(os.path.join(exp, "ok.txt"), b"fine")
    async with _mirror(exp, store) as m:
        ok = await _flush(m)
        assert store.nonregular == []  # the store was never handed the device to read
        assert ok and store.rels() == {"ok.txt"}
        assert {"zeros.bin", "null.log"} <= set(m.skipped)
    assert _warnings(caplog, "'zeros.bin'") == 1


async def test_file_over_the_cap_is_skipped_with_a_log_line(
    exp: str, store: GuardStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "ckptd.mirror")
    _write(os.path.join(exp, "big.bin"), b"b" * 4000)
    _write(os.path.join(exp, "small.bin"), b"s" * 1000)
    async with _mirror(exp, store, max_file_size=1000) as m:
        assert await _flush(m)
        assert store.rels() == {"small.bin"}
        assert "cap" in m.skipped["big.bin"]
        _write(os.path.join(exp, "big.bin"), b"now small")  # back under the cap: uploaded
        await _until_keys(store, {"big.bin"})
        assert "big.bin" not in m.skipped
    assert _warnings(caplog, "'big.bin'") == 1


async def test_sparse_file_is_skipped(
    exp: str, store: GuardStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "ckptd.mirror")
    path = os.path.join(exp, "scratch.bin")
    with open(path, "wb") as f:
        f.write(b"head")
        f.truncate(64 << 20)
    st = os.stat(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        has_holes = os.lseek(fd, 0, os.SEEK_HOLE) < st.st_size
    except OSError:
        has_holes = False
    finally:
        os.close(fd)
    if st.st_blocks * 512 >= st.st_size // 2 or not has_holes:
        pytest.skip("this filesystem does not keep sparse files sparse")
    _write(os.path.join(exp, "ok.txt"), b"fine")
    async with _mirror(exp, store) as m:  # the default cap (1 GiB) is not what skips it
        assert await _flush(m)
        assert store.rels() == {"ok.txt"}
        assert "sparse" in m.skipped["scratch.bin"]
    assert _warnings(caplog, "'scratch.bin'") == 1


async def test_names_that_cannot_be_keys_are_skipped(
    exp: str, store: GuardStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "ckptd.mirror")
    bad = ["evil\nname.txt", "trailing.txt\n", "bell\x07dir/x.txt", "-dash.txt"]
    for rel in bad:
        _write(os.path.join(exp, *rel.split("/")), b"bad")
    _write(os.path.join(exp, "results", "plot.png"), b"good")
    async with _mirror(exp, store) as m:
        assert await _flush(m)
        assert store.rels() == {"results/plot.png"}
        _write(os.path.join(exp, "late\rname.txt"), b"bad")
        _write(os.path.join(exp, "late-ok.txt"), b"good")
        await _until_keys(store, {"late-ok.txt"})
        assert await _flush(m)
        assert store.rels() == {"results/plot.png", "late-ok.txt"}
        assert set(bad) | {"late\rname.txt"} <= set(m.skipped)
    assert _warnings(caplog, repr("evil\nname.txt")) == 1


@pytest.mark.parametrize("deaf", [False, True], ids=["hangs", "hangs-and-ignores-cancel"])
async def test_stop_returns_in_time_when_the_store_hangs(exp: str, deaf: bool) -> None:
    store = HangingStore(f"memory://hostile-{uuid.uuid4().hex}", deaf=deaf)
    # Let a deaf store go in the end even if stop() waits for it: then the test fails, not hangs.
    asyncio.get_running_loop().call_later(BOUND_S / 2, store.release.set)
    _write(os.path.join(exp, "a.txt"), b"a")
    m = Mirror(exp, store, PREFIX, quiet_s=0.05)
    await m.start()
    deadline = time.monotonic() + BOUND_S
    while store.calls == 0:  # the upload has reached the store and hangs there
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    t0 = time.monotonic()
    try:
        ok = await asyncio.wait_for(m.stop(timeout=1.0), BOUND_S)
        assert time.monotonic() - t0 < 3.0
        assert ok is False
        assert m.pending() == ["a.txt"]  # reported as not uploaded, not forgotten
        assert store.rels() == set()
    finally:
        store.release.set()


async def test_an_upload_that_hangs_times_out(exp: str) -> None:
    """``flush()`` with no timeout still returns: each upload has its own bound."""
    store = HangingStore(f"memory://hostile-{uuid.uuid4().hex}")
    _write(os.path.join(exp, "a.txt"), b"a")
    m = Mirror(exp, store, PREFIX, quiet_s=0.05, upload_timeout_s=0.3)
    await m.start()
    try:
        assert await asyncio.wait_for(m.flush(), BOUND_S) is False
        assert "timed out" in m.failed["a.txt"]
    finally:
        assert not await asyncio.wait_for(m.stop(timeout=1.0), BOUND_S)
    assert m.pending() == ["a.txt"]


async def test_file_changed_during_upload_is_uploaded_again_whole(
    exp: str, store: GuardStore
) -> None:
    """The store reads a file that moved on since its checksum: refused, then taken again."""
    path = os.path.join(exp, "metrics.jsonl")
    _write(path, b'{"step": 1}\n')
    real = store.put_file
    changed = False

    async def put_and_change(key: str, source: str, **kw: object) -> None:
        nonlocal changed
        if not changed:
            changed = True
            with open(path, "ab") as f:  # the trainer appends while the upload runs
                f.write(b'{"step": 2}\n')
        await real(key, source, **kw)  # type: ignore[arg-type]

    store.put_file = put_and_change  # type: ignore[method-assign]
    async with _mirror(exp, store) as m:
        deadline = time.monotonic() + BOUND_S
        while store.value("metrics.jsonl") != b'{"step": 1}\n{"step": 2}\n':
            assert store.value("metrics.jsonl") is None, "a torn or stale copy was kept"
            assert time.monotonic() < deadline, "the changed file was never uploaded again"
            await asyncio.sleep(0.02)
        assert await _flush(m)


async def test_transient_failures_still_retry(exp: str, store: GuardStore) -> None:
    """The new checks change nothing for a healthy file behind a flaky store."""
    _write(os.path.join(exp, "a.txt"), b"a")
    real = store.put_file
    fails = [TransientStorageError("flaky")]

    async def flaky(key: str, source: str, **kw: object) -> None:
        if fails:
            raise fails.pop()
        await real(key, source, **kw)  # type: ignore[arg-type]

    store.put_file = flaky  # type: ignore[method-assign]
    async with _mirror(exp, store) as m:
        assert await _flush(m)
        assert store.value("a.txt") == b"a" and m.uploads == 1


async def test_registry_passes_the_cap_and_reports_what_it_skipped(exp: str, outside: str) -> None:
    """``Mirrors(..., max_file_size=N)`` is how the daemon sets the cap; replies list skips."""
    from ckptd.daemon.mirror import Mirrors

    _write(os.path.join(exp, "big.bin"), b"b" * 100)
    _write(os.path.join(exp, "ok.txt"), b"fine")
    os.symlink(os.path.join(outside, "credentials"), os.path.join(exp, "creds"))
    store = GuardStore(f"memory://hostile-{uuid.uuid4().hex}")
    reg = Mirrors(lambda url: store, store.url, quiet_s=0.05, max_file_size=10)
    base = {"run": "p/n/ts", "dir": exp}
    try:
        r = await asyncio.wait_for(reg.handle({**base, "action": "flush", "timeout": 10}), BOUND_S)
        assert r["ok"] and r["pending"] == []
        assert set(r["skipped"]) == {"big.bin", "creds"}
        assert store.rels() == {"ok.txt"}
    finally:
        assert await asyncio.wait_for(reg.stop_all(5), BOUND_S)
        MemoryStore.clear(store.name)


def test_the_daemon_skips_links_and_fifos_and_still_exits(make_daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The real daemon: the link's target never reaches the store, and SIGTERM exits it."""
    from ckptd.experiment import Experiment

    secret = tmp_path / "credentials"
    secret.write_bytes(b"SECRET-KEY")
    store = str(tmp_path / "store")
    d = make_daemon(store=store)
    exp = Experiment("p", "hostile", socket=d.socket, config={"a": 1})
    if "mirror" not in exp.checkpointer.daemon_info.get("features", ()):
        exp.finish()
        pytest.skip("this daemon has no mirror op yet")
    fifo = os.path.join(exp.dir, "pipe")
    try:
        os.symlink(str(secret), os.path.join(exp.dir, "creds"))
        os.mkfifo(fifo)
        assert exp.sync(timeout=BOUND_S)
        assert exp.finish(timeout=BOUND_S)
        remote = os.path.join(store, exp.run, "experiment")
        assert os.path.exists(os.path.join(remote, "run.json"))
        assert not os.path.lexists(os.path.join(remote, "creds"))
        assert not os.path.lexists(os.path.join(remote, "pipe"))
        for dirpath, _, files in os.walk(store):
            for name in files:
                with open(os.path.join(dirpath, name), "rb") as f:
                    assert b"SECRET-KEY" not in f.read(), name
        assert d.stop(timeout=BOUND_S) == 0
    finally:
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert "'creds'" in d.log_text()
