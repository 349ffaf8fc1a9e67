"""``ckptd restore URL[@TAG] DEST`` streams each file straight to its place in DEST: part by part
from the store (or a local copy), CRC32C checked on the fly, no temporary copy. While it runs,
DEST holds only ``.<name>.partial`` files and files that have verified, never a manifest; a
corrupt, truncated or missing file fails the restore and leaves DEST empty.

Parts are shrunk to 64 KiB so that small files take several concurrent parts.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import Iterator
from typing import Any

import crc32c
import pytest

import ckptd.readinto as readinto
from ckptd.cli import main as cli
from ckptd.storage import open_store
from ckptd.storage.memory import MemoryStore

PART = 64 << 10


def files() -> dict[str, bytes]:
    rng = random.Random(16)
    return {
        "big.safetensors": rng.randbytes(5 * PART + 123),  # six parts, the last short
        "small.safetensors": rng.randbytes(1000),
        "empty.bin": b"",
        "state.msgpack": rng.randbytes(PART),  # exactly one part
    }


def put(url: str, tag: str, data: dict[str, bytes]) -> None:
    recs = {n: {"size": len(b), "crc32c": f"{crc32c.crc32c(b):08x}"} for n, b in data.items()}
    doc = {"tag": tag, "step": 7, "files": recs, "created": "2026-12-01T00:00:07Z"}

    async def go() -> None:
        async with open_store(url) as store:
            for name, b in data.items():
                await store.put_bytes(f"checkpoints/{tag}/{name}", b)
            await store.put_bytes(f"checkpoints/{tag}/MANIFEST.json", json.dumps(doc).encode())
            await store.put_bytes("latest", tag.encode())

    asyncio.run(go())


def damage(url: str, tag: str, name: str, how: str) -> None:
    async def go() -> None:
        async with open_store(url) as store:
            key = f"checkpoints/{tag}/{name}"
            if how == "delete":
                await store.delete(key)
                return
            data = bytearray(await store.get_bytes(key))
            if how == "flip":
                data[len(data) - 7] ^= 0x01  # in the last part
            else:
                del data[len(data) // 2 :]
            await store.put_bytes(key, bytes(data))

    asyncio.run(go())


@pytest.fixture(params=["local", "memory", "s3", "gcs"])
def run_url(
    request: pytest.FixtureRequest, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(readinto, "_COPY_PART", PART)
    if request.param == "local":
        yield str(tmp_path / "store" / "run")
    elif request.param == "memory":
        try:
            yield "memory://restore-cli/run"
        finally:
            MemoryStore.clear("restore-cli")
    elif request.param == "s3":
        yield f"s3://{request.getfixturevalue('s3_bucket')}/pre/run"
    else:
        yield f"gs://{request.getfixturevalue('gcs_bucket')}/pre/run"


def test_restore_streams_every_file_into_dest_bitwise_equal(
    run_url: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    data = files()
    put(run_url, "s7", data)
    dest = tmp_path / "dest"
    scratch = tmp_path / "tmp"  # a restore that stages a copy would leave it here, or fail
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    seen: list[tuple[str, list[str]]] = []
    read_listed = readinto.read_listed

    async def watched(src: Any, name: str, rec: Any, buf: Any, **kw: Any) -> int:
        seen.append((name, sorted(os.listdir(dest))))
        return await read_listed(src, name, rec, buf, **kw)

    monkeypatch.setattr(readinto, "read_listed", watched)
    assert cli(["restore", f"{run_url}@s7", str(dest)]) == 0
    assert sorted(os.listdir(dest)) == sorted([*data, "MANIFEST.json"])
    for name, b in data.items():
        assert (dest / name).read_bytes() == b
    assert json.loads((dest / "MANIFEST.json").read_text())["tag"] == "s7"
    assert os.listdir(scratch) == []
    assert len([n for n, _ in seen if n == "big.safetensors"]) == 6  # part by part
    for name, listing in seen:
        assert "MANIFEST.json" not in listing  # written last
        assert f".{name}.partial" in listing and name not in listing  # in flight: partial only
        for other in listing:  # a listed name appears only once its file has verified
            if not other.startswith("."):
                assert (dest / other).read_bytes() == data[other]
    assert cli(["verify", str(dest)]) == 0


@pytest.mark.parametrize(
    ("name", "how"),
    [("big.safetensors", "flip"), ("big.safetensors", "truncate"), ("state.msgpack", "delete")],
)
def test_a_bad_file_fails_the_restore_and_leaves_dest_empty(
    run_url: str, tmp_path, capsys: pytest.CaptureFixture[str], name: str, how: str
) -> None:  # type: ignore[no-untyped-def]
    put(run_url, "s7", files())
    damage(run_url, "s7", name, how)
    dest = tmp_path / "dest"
    assert cli(["restore", f"{run_url}@s7", str(dest)]) == 1
    assert name in capsys.readouterr().err
    assert os.listdir(dest) == []  # no partial files, no verified ones, no manifest
