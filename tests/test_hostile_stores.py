"""Trust nothing: stores written by an attacker, read by ``load``, ``verify``, ``restore``, ``ls``,
``gc`` and ``dcp.Reader``. Only ``CkptdError`` subclasses come out, and nothing is read or
written outside the checkpoint or the destination.

Checkpoints are written here by hand (safetensors bytes, msgpack, a manifest), so each case runs
in-process in milliseconds, on the local store or the in-memory one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import tempfile
from collections.abc import Iterator
from typing import Any

import crc32c
import msgpack
import pytest
import torch

import ckptd
from ckptd.catalog import list_checkpoints, run_sync, verify
from ckptd.cli import main as cli
from ckptd.dcp import Reader
from ckptd.errors import CkptdError, IntegrityError, NotFoundError, PermanentStorageError
from ckptd.header import encode_header
from ckptd.retention import Retention, apply
from ckptd.storage.local import LocalStore
from ckptd.storage.memory import MemoryStore

GOOD = torch.arange(6, dtype=torch.float32).reshape(2, 3)


def safetensors(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> bytes:
    header: dict[str, Any] = {"__metadata__": meta or {"format": "pt"}}
    data, off = b"", 0
    for key, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[key] = {
            "dtype": "F32",
            "shape": list(t.shape),
            "data_offsets": [off, off + len(raw)],
        }
        data, off = data + raw, off + len(raw)
    return encode_header(header) + data


def good_files(value: torch.Tensor = GOOD) -> dict[str, bytes]:
    return {
        "model.weights.safetensors": safetensors({"w": value}),
        "extra.msgpack": msgpack.packb({"seen": 1}),
    }


def manifest_for(tag: str, step: int, files: dict[str, bytes], **more: Any) -> dict[str, Any]:
    recs = {n: {"size": len(b), "crc32c": f"{crc32c.crc32c(b):08x}"} for n, b in files.items()}
    return {"tag": tag, "step": step, "files": recs, "created": "2026-12-01T00:00:00Z", **more}


def write_local(run: str, tag: str, files: dict[str, bytes], manifest: Any = None,
                raw: bytes | None = None) -> str:  # fmt: skip
    """A checkpoint directory with these files and this manifest (default: the right one)."""
    ck = os.path.join(run, "checkpoints", tag)
    os.makedirs(ck, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(ck, name), "wb") as f:
            f.write(data)
    if raw is None:
        raw = json.dumps(manifest if manifest is not None else manifest_for(tag, 1, files)).encode()
    with open(os.path.join(ck, "MANIFEST.json"), "wb") as f:
        f.write(raw)
    return ck


def write_memory(url: str, tag: str, files: dict[str, bytes], manifest: Any) -> None:
    """Objects under their literal keys, the way a hostile S3 bucket may hold them."""

    async def go() -> None:
        store = MemoryStore(url)
        for name, data in files.items():
            await store.put_bytes(f"checkpoints/{tag}/{name}", data)
        await store.put_bytes(f"checkpoints/{tag}/MANIFEST.json", json.dumps(manifest).encode())

    run_sync(go())


@pytest.fixture
def memory_run(request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"hostile-{request.node.name}"
    yield f"memory://{name}"
    MemoryStore.clear(name)


@pytest.fixture
def private_tmp(tmp_path, monkeypatch: pytest.MonkeyPatch) -> str:  # type: ignore[no-untyped-def]
    """Temporary directories of the readers go here, so an escape from one lands in sight."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return str(tmp)


def _all_files(root: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


# ---- manifests that name files outside their checkpoint -------------------------------------------

ESCAPES = ["../escaped", "../../escaped", "/tmp/ckptd-escaped-abs", "a/b", "x\n", "MANIFEST.json",
           "", ".hidden", "x\x00y"]  # fmt: skip


@pytest.mark.parametrize("name", ESCAPES)
def test_manifest_file_names_outside_the_checkpoint_are_refused_remote(
    name: str, memory_run: str, private_tmp: str
) -> None:
    """From a remote store the old reader downloaded ``tmp/../escaped``: outside its temp dir."""
    files = {**good_files(), name: b"attacker's bytes"}
    write_memory(memory_run, "t", files, manifest_for("t", 1, files))
    before = _all_files(os.path.dirname(private_tmp))
    for read in (lambda: ckptd.load(memory_run, tag="t"), lambda: verify(memory_run, "t")):
        with pytest.raises(IntegrityError, match="@t"):
            read()
    assert _all_files(os.path.dirname(private_tmp)) == before
    assert not os.path.exists("/tmp/ckptd-escaped-abs")


@pytest.mark.parametrize("name", ["../outside.bin", "../../victim/secret.bin"])
def test_manifest_file_names_outside_the_checkpoint_are_refused_local(tmp_path, name: str) -> None:  # type: ignore[no-untyped-def]
    store = tmp_path / "store"
    run = str(store / "r")
    secret = b"not yours"
    (store / "victim").mkdir(parents=True)
    (store / "victim" / "secret.bin").write_bytes(secret)
    os.makedirs(os.path.join(run, "checkpoints"))
    (store / "r" / "checkpoints" / "outside.bin").write_bytes(secret)
    files = good_files()
    man = manifest_for("t", 1, {**files, name: secret})
    write_local(run, "t", files, man)
    dest = tmp_path / "dest"
    with pytest.raises(IntegrityError, match="outside its checkpoint"):
        ckptd.load(run, tag="t")
    with pytest.raises(IntegrityError):
        verify(run, "t")
    assert cli(["restore", f"{run}@t", str(dest)]) == 1
    assert not dest.exists() or not os.listdir(dest)
    assert cli(["verify", f"{run}@t"]) == 1


def test_wrong_tag_in_manifest_never_loads_another_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = str(tmp_path / "r")
    write_local(run, "step-1", good_files())
    other = good_files(GOOD + 100)
    write_local(run, "step-9", other, manifest_for("step-1", 9, good_files()))
    with pytest.raises(IntegrityError, match="step-9"):
        ckptd.load(run, tag="step-9")
    assert [m["tag"] for m in list_checkpoints(run)] == ["step-1"]
    assert torch.equal(ckptd.load(run)["model"]["w"], GOOD)


BAD_MANIFESTS: list[tuple[str, Any]] = [
    ("a list", []),
    ("a string", "MANIFEST"),
    ("null", None),
    ("a number", 7),
    ("no files", {"tag": "bad", "step": 1}),
    ("files as a list", {"tag": "bad", "step": 1, "files": ["model.weights.safetensors"]}),
    ("step as a string", {"tag": "bad", "step": "9", "files": {}}),
    ("step as a float", {"tag": "bad", "step": 9.5, "files": {}}),
    ("step as a bool", {"tag": "bad", "step": True, "files": {}}),
    ("no step", {"tag": "bad", "files": {}}),
    ("tag as a number", {"tag": 5, "step": 1, "files": {}}),
    ("no tag", {"step": 1, "files": {}}),
    ("size as a string", {"tag": "bad", "step": 1,
                          "files": {"x.bin": {"size": "10", "crc32c": "00000000"}}}),
    ("negative size", {"tag": "bad", "step": 1,
                       "files": {"x.bin": {"size": -1, "crc32c": "00000000"}}}),
    ("huge size", {"tag": "bad", "step": 1,
                   "files": {"x.bin": {"size": 10**30, "crc32c": "00000000"}}}),
    ("crc as a number", {"tag": "bad", "step": 1, "files": {"x.bin": {"size": 1, "crc32c": 5}}}),
    ("crc not hex", {"tag": "bad", "step": 1, "files": {"x.bin": {"size": 1, "crc32c": "zz"}}}),
    ("record as a list", {"tag": "bad", "step": 1, "files": {"x.bin": [1, "00000000"]}}),
    ("traversal", {"tag": "bad", "step": 1,
                   "files": {"../x": {"size": 1, "crc32c": "00000000"}}}),
    ("created as a dict", {"tag": "bad", "step": 1, "files": {}, "created": {}}),
]  # fmt: skip
BAD_RAW = [("invalid JSON", b'{"tag": "bad", "step": 1, "files": {'),
           ("deeply nested JSON", b"[" * 100_000 + b"]" * 100_000),
           ("not UTF-8", b'{"tag": "\xff\xfe"}')]  # fmt: skip


@pytest.mark.parametrize(
    ("why", "raw"),
    [(w, json.dumps(m).encode()) for w, m in BAD_MANIFESTS] + BAD_RAW,
    ids=[w for w, _ in BAD_MANIFESTS] + [w for w, _ in BAD_RAW],
)
def test_one_bad_manifest_hides_only_its_checkpoint(tmp_path, caplog, why: str, raw: bytes) -> None:  # type: ignore[no-untyped-def]
    run = str(tmp_path / "r")
    write_local(run, "step-1", good_files())
    write_local(run, "bad", {}, raw=raw)
    with caplog.at_level(logging.WARNING, logger="ckptd.catalog"):
        assert [m["tag"] for m in list_checkpoints(run)] == ["step-1"]
    assert "bad" in caplog.text
    assert torch.equal(ckptd.load(run)["model"]["w"], GOOD)
    with pytest.raises(IntegrityError, match="bad"):
        ckptd.load(run, tag="bad")
    assert cli(["ls", run]) == 0
    assert cli(["verify", f"{run}@bad"]) == 1


def test_a_missing_tag_lists_the_tags_there(tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = str(tmp_path / "r")
    write_local(run, "step-1", good_files())
    write_local(run, "step-2", good_files(), manifest_for("step-2", 2, good_files()))
    with pytest.raises(NotFoundError, match=r"step-9.*step-1, step-2"):
        ckptd.load(run, tag="step-9")


# ---- symbolic links ---------------------------------------------------------------------------------


def test_a_linked_data_file_is_never_followed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The manifest has the CRC of the reader's own secret file; the store links to it."""
    secret_path = tmp_path / "secret"
    secret = safetensors({"w": torch.full((2, 3), 42.0)})
    secret_path.write_bytes(secret)
    run = str(tmp_path / "store" / "r")
    files = {"model.weights.safetensors": secret}
    ck = write_local(run, "t", {}, manifest_for("t", 1, files))
    os.symlink(secret_path, os.path.join(ck, "model.weights.safetensors"))
    with pytest.raises(IntegrityError, match="symbolic link"):
        ckptd.load(run, tag="t")
    with pytest.raises(IntegrityError, match="symbolic link"):
        verify(run, "t")
    dest = tmp_path / "dest"
    assert cli(["restore", f"{run}@t", str(dest)]) == 1
    assert not (dest / "model.weights.safetensors").exists()


def test_a_linked_checkpoint_directory_is_never_read(tmp_path) -> None:  # type: ignore[no-untyped-def]
    outside = str(tmp_path / "outside")
    write_local(
        outside, "evil", good_files(GOOD + 7), manifest_for("evil", 5, good_files(GOOD + 7))
    )
    run = tmp_path / "store" / "r"
    write_local(str(run), "step-1", good_files())
    os.symlink(os.path.join(outside, "checkpoints", "evil"), run / "checkpoints" / "evil")
    assert [m["tag"] for m in list_checkpoints(str(run))] == ["step-1"]
    with pytest.raises(PermanentStorageError, match="symbolic link"):
        ckptd.load(str(run), tag="evil")


def test_restore_refuses_a_dest_holding_a_link(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    run = str(tmp_path / "r")
    write_local(run, "step-1", good_files())
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(target, dest / "model.weights.safetensors")
    assert cli(["restore", run, str(dest)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert target.read_bytes() == b"precious"
    assert os.listdir(dest) == ["model.weights.safetensors"]


def test_restore_refuses_a_non_empty_dest(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    run = str(tmp_path / "r")
    write_local(run, "step-1", good_files())
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    assert cli(["restore", run, str(dest)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert os.listdir(dest) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["restore", run, str(empty)]) == 0
    assert sorted(os.listdir(empty)) == [
        "MANIFEST.json",
        "extra.msgpack",
        "model.weights.safetensors",
    ]
    assert torch.equal(ckptd.load(str(empty))["model"]["w"], GOOD)


# ---- gc ------------------------------------------------------------------------------------------------


def test_gc_never_deletes_through_a_hostile_tag(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = tmp_path / "store"
    victim = str(store / "victim")
    write_local(victim, "step-1", good_files())
    before = _all_files(victim)
    run = str(store / "r")
    write_local(run, "step-1", good_files())
    write_local(run, "step-2", good_files(), manifest_for("step-2", 2, good_files()))
    hostile = manifest_for("../../victim/checkpoints/step-1", 0, good_files())
    write_local(run, "x", {}, hostile)
    assert cli(["gc", run, "--keep-last", "1"]) == 0
    assert _all_files(victim) == before
    left = {m["tag"] for m in list_checkpoints(run)}
    assert left == {"step-2"}
    assert os.path.exists(os.path.join(run, "checkpoints", "x", "MANIFEST.json"))


@pytest.mark.parametrize("linked", ["checkpoints", "run"])
def test_gc_never_deletes_through_a_linked_directory(tmp_path, linked: str) -> None:  # type: ignore[no-untyped-def]
    outside = tmp_path / "outside"
    real = str(outside / "r")
    write_local(real, "step-1", good_files())
    write_local(real, "step-2", good_files(), manifest_for("step-2", 2, good_files()))
    before = _all_files(str(outside))
    store = tmp_path / "store"
    if linked == "run":
        store.mkdir()
        os.symlink(real, store / "r")
    else:
        (store / "r").mkdir(parents=True)
        os.symlink(os.path.join(real, "checkpoints"), store / "r" / "checkpoints")
    if linked == "checkpoints":
        assert cli(["gc", str(store / "r"), "--keep-last", "1"]) == 0
    run_sync(apply(LocalStore(str(store)), "r", Retention(keep_last=1)))  # the daemon's way
    assert _all_files(str(outside)) == before


async def test_local_store_deletes_nothing_through_a_link(tmp_path) -> None:  # type: ignore[no-untyped-def]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "MANIFEST.json").write_text("{}")
    (tmp_path / "store" / "r" / "checkpoints").mkdir(parents=True)
    os.symlink(outside, tmp_path / "store" / "r" / "checkpoints" / "t")
    store = LocalStore(str(tmp_path / "store"))
    with pytest.raises(PermanentStorageError, match="symbolic link"):
        await store.delete("r/checkpoints/t/MANIFEST.json")
    with pytest.raises(PermanentStorageError, match="symbolic link"):
        await store.put_bytes("r/checkpoints/t/x", b"data")
    assert sorted(os.listdir(outside)) == ["MANIFEST.json"]
    assert await store.list("r/") == []


# ---- hostile file contents (the manifest's checksums match them) --------------------------------------


def _header(entries: dict[str, Any], data: bytes = b"") -> bytes:
    raw = json.dumps(entries).encode()
    return len(raw).to_bytes(8, "little") + raw + data


HOSTILE_FILES: list[tuple[str, str, bytes]] = [
    ("header length past the file", "model.weights.safetensors", (1 << 62).to_bytes(8, "little")),
    ("header deeply nested", "model.weights.safetensors",
     len(b"[" * 50_000).to_bytes(8, "little") + b"[" * 50_000),
    ("header not an object", "model.weights.safetensors", _header([1, 2])),  # type: ignore[arg-type]
    ("unknown dtype", "model.weights.safetensors",
     _header({"w": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)),
    ("shape of strings", "model.weights.safetensors",
     _header({"w": {"dtype": "F32", "shape": ["a"], "data_offsets": [0, 4]}}, b"\0" * 4)),
    ("negative shape", "model.weights.safetensors",
     _header({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4)),
    ("offsets not matching the shape", "model.weights.safetensors",
     _header({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 4]}}, b"\0" * 4)),
    ("overlapping tensors", "model.weights.safetensors",
     _header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)),
    ("metadata not an object", "model.weights.safetensors", _header({"__metadata__": [1]})),
    ("alias to nothing", "model.weights.safetensors",
     _header({"__metadata__": {"ckptd.aliases": '{"a": "missing"}'}})),
    ("nontensor to a missing tensor", "model.weights.safetensors",
     _header({"__metadata__": {"ckptd.nontensor": '{"x": {"__ckptd__": "tensor", "key": "k"}}'}})),
    ("nontensor not JSON", "model.weights.safetensors",
     _header({"__metadata__": {"ckptd.nontensor": "{"}})),
    ("optimizer state as a number", "model.optim.safetensors",
     _header({"__metadata__": {"ckptd.optimizer": "[[[["}})),
    ("model name the loader reserves", "optimizers.weights.safetensors", _header({})),
    ("msgpack nested deeply", "extra.msgpack", b"\x91" * 100_000 + b"\x01"),
    ("msgpack list as a map key", "extra.msgpack", b"\x81\x91\x01\x01"),
    ("msgpack truncated", "extra.msgpack", b"\x92\x01"),
    ("msgpack huge array header", "extra.msgpack", b"\xdd\xff\xff\xff\xff"),
    ("msgpack extension type", "extra.msgpack", b"\xd4\x05\x00"),
    ("msgpack trailing bytes", "extra.msgpack", b"\x01\x02"),
    ("extras tag without items", "extra.msgpack", msgpack.packb({"__ckptd__": "tuple"})),
    ("extras tensor not saved", "extra.msgpack",
     msgpack.packb({"__ckptd__": "tensor", "key": "nope"})),
    ("extras ndarray of a bad dtype", "extra.msgpack",
     msgpack.packb({"__ckptd__": "ndarray", "key": "nope", "dtype": "<f4"})),
]  # fmt: skip


@pytest.mark.parametrize(
    ("why", "name", "data"), HOSTILE_FILES, ids=[w for w, _, _ in HOSTILE_FILES]
)
def test_hostile_file_contents_raise_integrity_error_naming_the_file(
    tmp_path, why: str, name: str, data: bytes
) -> None:  # type: ignore[no-untyped-def]
    run = str(tmp_path / "r")
    files = {**good_files(), name: data}
    write_local(run, "t", files, manifest_for("t", 1, files))
    with pytest.raises(IntegrityError, match=re.escape(name)):
        ckptd.load(run, tag="t")


# ---- dcp.Reader -----------------------------------------------------------------------------------------

DCP_METADATA = {"format": "ckptd-dcp/1", "version": "1", "state_dict_metadata": {},
                "storage_data": [], "planner_data": None}  # fmt: skip


def test_dcp_reader_refuses_hostile_manifests_and_metadata(tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = str(tmp_path / "r")
    meta = json.dumps(DCP_METADATA).encode()
    files = {"dcp-metadata.json": meta}
    hostile = manifest_for("t", 1, {**files, "../../x.safetensors": b""}, kind="dcp")
    write_local(run, "t", files, hostile)
    reader = Reader(url=run)
    reader.reset("t")
    with pytest.raises(IntegrityError, match="outside its checkpoint"):
        reader.read_metadata()
    for doc in ({**DCP_METADATA, "state_dict_metadata": []},
                {**DCP_METADATA, "storage_data": [["w", [0], 0, "../shard.safetensors", "w"]]},
                {**DCP_METADATA, "state_dict_metadata": {"w": {"type": "tensor", "dtype": "F32",
                 "requires_grad": False, "size": [-5], "chunks": []}}}):  # fmt: skip
        files = {"dcp-metadata.json": json.dumps(doc).encode()}
        write_local(run, "u", files, manifest_for("u", 2, files, kind="dcp"))
        reader = Reader(url=run)
        reader.reset("u")
        with pytest.raises(IntegrityError, match=r"dcp-metadata\.json"):
            reader.read_metadata()


def test_dcp_reader_names_the_tags_there(tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = str(tmp_path / "r")
    files = {"dcp-metadata.json": json.dumps(DCP_METADATA).encode()}
    write_local(run, "step-3", files, manifest_for("step-3", 3, files, kind="dcp"))
    reader = Reader(url=run)
    reader.reset("step-4")
    with pytest.raises(NotFoundError, match="step-3"):
        reader.read_metadata()


# ---- fuzzing: random mutations, only CkptdError may come out ------------------------------------------

_ODD_VALUES: list[Any] = [None, True, -1, 0, 2**70, 1.5, float("nan"), "", "../x", "/etc/passwd",
                          "x\n", "a/b", [], {}, [1, 2], {"size": 1}, "0" * 8, "MANIFEST.json"]  # fmt: skip


def _mutate_json(obj: Any, rng: random.Random, depth: int = 0) -> Any:
    """One random change somewhere in a JSON value: replace, drop or add a key, or recurse."""
    if isinstance(obj, dict) and obj and depth < 4 and rng.random() < 0.7:
        key = rng.choice(list(obj))
        out = dict(obj)
        roll = rng.random()
        if roll < 0.15:
            del out[key]
        elif roll < 0.3:
            out[rng.choice(_ODD_VALUES[7:12])] = out.pop(key)  # a hostile key
        else:
            out[key] = _mutate_json(obj[key], rng, depth + 1)
        return out
    if isinstance(obj, list) and obj and depth < 4 and rng.random() < 0.7:
        out_list = list(obj)
        i = rng.randrange(len(out_list))
        out_list[i] = _mutate_json(out_list[i], rng, depth + 1)
        return out_list
    return rng.choice(_ODD_VALUES)


def _flip_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if b:
            b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b[: rng.randint(0, len(b))] if rng.random() < 0.1 else b)


def _only_ckptd_errors(fn: Any, *args: Any, **kw: Any) -> None:
    with contextlib.suppress(CkptdError):
        fn(*args, **kw)


def test_fuzzed_manifests_raise_only_ckptd_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(1414)
    files = {**good_files(), "extra.safetensors": safetensors({"rng": torch.ones(4)})}
    base = manifest_for("t", 1, files)
    for i in range(150):
        run = str(tmp_path / f"r{i}")
        if rng.random() < 0.8:
            raw = json.dumps(_mutate_json(base, rng)).encode()
        else:
            raw = _flip_bytes(json.dumps(base).encode(), rng)
        write_local(run, "t", files, raw=raw)
        _only_ckptd_errors(ckptd.load, run, tag="t")
        _only_ckptd_errors(ckptd.load, run)
        _only_ckptd_errors(verify, run, "t")
        _only_ckptd_errors(list_checkpoints, run)


def test_fuzzed_safetensors_headers_raise_only_ckptd_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(1415)
    entries = {"__metadata__": {"format": "pt", "ckptd.aliases": '{"v": "w"}'},
               "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
               "b": {"dtype": "I64", "shape": [1], "data_offsets": [24, 32]}}  # fmt: skip
    data = GOOD.view(torch.uint8).numpy().tobytes() + (7).to_bytes(8, "little")
    for i in range(200):
        if rng.random() < 0.7:
            raw = json.dumps(_mutate_json(entries, rng)).encode()
            raw += b" " * (-(8 + len(raw)) % 8)
            blob = len(raw).to_bytes(8, "little") + raw + data
        else:
            blob = _flip_bytes(_header(entries, data), rng)
        files = {"model.weights.safetensors": blob}
        run = str(tmp_path / f"r{i}")
        write_local(run, "t", files, manifest_for("t", 1, files))
        _only_ckptd_errors(ckptd.load, run, tag="t")
