"""The experiment-folder mirror against real stores: a local directory and S3 (moto)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from ckptd.daemon.mirror import Mirror, Mirrors
from ckptd.errors import NotFoundError
from ckptd.storage import Store, open_store

PREFIX = "proj/exp/2026-01-01_00-00-00/experiment"


async def _until(cond: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll with a bound: the watcher's events have no hook a test could wait on."""
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _get(store: Store, rel: str) -> bytes | None:
    try:
        return await store.get_bytes(f"{PREFIX}/{rel}")
    except NotFoundError:
        return None


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture(params=["local", "s3"])
async def store(request, tmp_path) -> AsyncIterator[Store]:  # type: ignore[no-untyped-def]
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        url = f"s3://{bucket}/mirror"
    else:
        url = str(tmp_path / "store")
    async with open_store(url) as s:
        yield s


async def test_initial_new_changed_and_temp_files(store: Store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = tmp_path / "exp"
    d.mkdir()
    _write(str(d / "config_resolved.yaml"), b"lr: 0.1\n")
    m = Mirror(str(d), store, PREFIX, quiet_s=0.2)
    await m.start()
    try:
        assert await m.flush(timeout=30)
        assert await _get(store, "config_resolved.yaml") == b"lr: 0.1\n"
        # A new file, in a new subfolder, is uploaded once closed (no flush: the watcher does it).
        _write(str(d / "results" / "results.json"), b'{"acc": 1}')
        _write(str(d / "notes.txt.swp"), b"editor junk")
        _write(str(d / "partial.tmp"), b"half")
        await _until(
            lambda: _has(store, "results/results.json", b'{"acc": 1}'), 20, "new file uploaded"
        )
        # Changed: uploaded again.
        _write(str(d / "config_resolved.yaml"), b"lr: 0.2\n")
        await _until(lambda: _has(store, "config_resolved.yaml", b"lr: 0.2\n"), 20, "re-upload")
        # Renamed into place (the atomic-write pattern): the temp name never reaches the store.
        _write(str(d / "run.json.tmp"), b'{"status": "done"}')
        os.replace(d / "run.json.tmp", d / "run.json")
        assert await m.flush(timeout=30)
        assert await _get(store, "run.json") == b'{"status": "done"}'
        keys = {o.key for o in await store.list(PREFIX + "/")}
        assert keys == {
            f"{PREFIX}/{k}" for k in ("config_resolved.yaml", "results/results.json", "run.json")
        }
        assert m.pending() == []
    finally:
        assert await m.stop(timeout=30)


async def _has(store: Store, rel: str, data: bytes) -> bool:
    return await _get(store, rel) == data


async def test_appended_file_is_uploaded_without_going_quiet(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A file kept open and appended to (metrics.jsonl) goes up within max_delay_s."""
    d = tmp_path / "exp"
    d.mkdir()
    async with open_store(str(tmp_path / "store")) as store:
        m = Mirror(str(d), store, PREFIX, quiet_s=5.0, max_delay_s=0.3)
        await m.start()
        try:
            with open(d / "metrics.jsonl", "a", buffering=1) as f:
                n = 0

                async def uploaded() -> bool:
                    nonlocal n
                    n += 1
                    f.write(f'{{"step": {n}}}\n')  # keeps it busy: never quiet for 5 s
                    data = await _get(store, "metrics.jsonl")
                    return data is not None and data.count(b"\n") >= 3

                await _until(uploaded, 20, "an upload of a busy file")
                assert m.pending() == ["metrics.jsonl"] or m.pending() == []
            assert await m.flush(timeout=30)
            assert (await _get(store, "metrics.jsonl") or b"").count(b"\n") == n
        finally:
            await m.stop(timeout=10)


async def test_flush_is_false_until_done(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = tmp_path / "exp"
    d.mkdir()
    for i in range(20):
        _write(str(d / f"f{i}.bin"), os.urandom(64 << 10))
    gate = asyncio.Event()

    async with open_store(str(tmp_path / "store")) as store:
        real = store.put_file

        async def slow_put(key: str, path: str, **kw: object) -> None:
            await gate.wait()  # held back until the test lets uploads through
            await real(key, path, **kw)  # type: ignore[arg-type]

        store.put_file = slow_put  # type: ignore[method-assign]
        m = Mirror(str(d), store, PREFIX, quiet_s=0.05)
        await m.start()
        try:
            assert await m.flush(timeout=0.2) is False
            assert len(m.pending()) == 20
            gate.set()
            assert await m.flush(timeout=30) is True
            assert m.pending() == [] and m.uploads == 20
        finally:
            await m.stop(timeout=10)


async def test_folder_already_in_store_is_a_noop(tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "root"
    d = root / PREFIX
    d.mkdir(parents=True)
    _write(str(d / "a.txt"), b"x")
    async with open_store(str(root)) as store:
        m = Mirror(str(d), store, PREFIX)
        assert m.noop
        await m.start()
        assert await m.flush(0) and m.pending() == [] and m.uploads == 0
        await m.stop()


async def test_registry_start_flush_stop_and_release(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The daemon side of the socket op: one mirror per run, flushed and stopped on request."""
    d = tmp_path / "exp"
    d.mkdir()
    _write(str(d / "git.json"), b"{}")
    stores: dict[str, Store] = {}

    def store_for(url: str) -> Store:
        return stores.setdefault(url, open_store(url))

    dest = str(tmp_path / "store")
    reg = Mirrors(store_for, dest, quiet_s=0.05)
    base = {"run": "p/n/ts", "dir": str(d)}
    r = await reg.handle({**base, "action": "start"}, client=1)
    assert r["active"] is True
    r = await reg.handle({**base, "action": "flush", "timeout": 30}, client=1)
    assert r["ok"] and r["pending"] == []
    assert os.path.exists(os.path.join(dest, "p/n/ts/experiment/git.json"))
    with pytest.raises(ValueError, match="already mirrored"):
        await reg.handle({**base, "dir": str(tmp_path)}, client=1)
    _write(str(d / "main.log"), b"last words")
    reg.release(1)  # the client died: its mirror is flushed and stopped
    assert await reg.flush_all(30)
    assert reg.pending() == {}
    with open(os.path.join(dest, "p/n/ts/experiment/main.log"), "rb") as f:
        assert f.read() == b"last words"
    assert (await reg.handle({**base, "action": "stop"}))["active"] is False
    assert await reg.stop_all(5)
