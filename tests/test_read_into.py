"""Restores read straight into their destination: ``ckptd.load``, ``restore_into`` and the DCP
reader's file reads, from a local copy, S3 (moto) and GCS (fake-gcs), bitwise equal; a corrupt,
truncated or missing file is refused (and restore falls back to an older checkpoint).

Checkpoints are laid out with ``fmt.plan_save`` (the Checkpointer's own layout) and written by
hand, so no daemon is needed.
"""

from __future__ import annotations

import asyncio
import json

import crc32c
import pytest
import torch
from torch import nn

from ckptd.catalog import verify
from ckptd.errors import IntegrityError
from ckptd.fmt import plan_save
from ckptd.reader import load, restore_into
from ckptd.storage import open_store

MiB = 1 << 20


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 256)
        self.b = nn.Linear(256, 64, bias=False)
        self.h16 = nn.Parameter(torch.zeros(33, dtype=torch.bfloat16))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))


def trained(seed: int) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for _ in range(2):
        loss = net.b(net.a(torch.randn(4, 64))).sum() + net.h16.float().sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    net.count += seed
    return net, opt


def checkpoint_files(net: nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, bytes]:
    plan = plan_save({"model": net}, {"model": opt}, {"step": step, "rng": torch.arange(5)})
    files = dict(plan.inline)
    for f in plan.files:
        data = bytearray(f.data_size)
        for slot, src in zip(f.tensors, f.srcs, strict=True):
            raw = src.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            data[slot.begin : slot.end] = raw
        files[f.name] = f.header + bytes(data)
    return files


def manifest(tag: str, step: int, files: dict[str, bytes]) -> bytes:
    recs = {n: {"size": len(b), "crc32c": f"{crc32c.crc32c(b):08x}"} for n, b in files.items()}
    doc = {"tag": tag, "step": step, "files": recs, "created": f"2026-12-01T00:00:{step:02d}Z"}
    return json.dumps(doc).encode()


def put(url: str, tag: str, step: int, files: dict[str, bytes]) -> None:
    """Write one checkpoint of the run at ``url`` (any store), manifest last, then latest."""

    async def go() -> None:
        async with open_store(url) as store:
            for name, data in files.items():
                await store.put_bytes(f"checkpoints/{tag}/{name}", data)
            await store.put_bytes(f"checkpoints/{tag}/MANIFEST.json", manifest(tag, step, files))
            await store.put_bytes("latest", tag.encode())

    asyncio.run(go())


def same(a: object, b: object) -> None:
    """Bitwise equal nested state (tensors compared by bytes, dtype and shape)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)  # type: ignore[arg-type]
        for x, y in zip(a, b, strict=True):  # type: ignore[call-overload]
            same(x, y)
    else:
        assert a == b


@pytest.fixture(params=["local", "s3", "gcs"])
def run_url(request: pytest.FixtureRequest, tmp_path) -> str:  # type: ignore[no-untyped-def]
    if request.param == "local":
        return str(tmp_path / "store" / "run")
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('s3_bucket')}/pre/run"
    return f"gs://{request.getfixturevalue('gcs_bucket')}/pre/run"


def test_load_is_bitwise_equal(run_url: str) -> None:
    net, opt = trained(1)
    put(run_url, "s1", 1, checkpoint_files(net, opt, 1))
    got = load(run_url)
    same(got["model"], net.state_dict())
    same(got["optimizer"], opt.state_dict())
    assert got["extra"]["step"] == 1
    same(got["extra"]["rng"], torch.arange(5))


def test_restore_into_model_and_optimizer_is_bitwise_equal(run_url: str) -> None:
    net, opt = trained(2)
    put(run_url, "s2", 2, checkpoint_files(net, opt, 2))
    fresh, fresh_opt = trained(7)
    params_before = {k: p.data_ptr() for k, p in fresh.named_parameters()}
    meta = restore_into([run_url], model=fresh, optimizer=fresh_opt)
    assert meta is not None and meta["step"] == 2 and meta["extra"]["step"] == 2
    same(fresh.state_dict(), net.state_dict())
    same(fresh_opt.state_dict(), opt.state_dict())
    # Restored in place: the module's own parameter storage, not new tensors.
    assert {k: p.data_ptr() for k, p in fresh.named_parameters()} == params_before
    # And the restored optimizer trains on like the original.
    for o in (opt, fresh_opt):
        o.step()
    same(fresh.state_dict(), net.state_dict())


def _corrupt(url: str, tag: str, name: str, how: str) -> None:
    async def go() -> None:
        async with open_store(url) as store:
            key = f"checkpoints/{tag}/{name}"
            data = bytearray(await store.get_bytes(key))
            if how == "flip":
                data[len(data) // 2] ^= 0x10
            elif how == "truncate":
                del data[len(data) // 2 :]
            if how == "delete":
                await store.delete(key)
            else:
                await store.put_bytes(key, bytes(data))

    asyncio.run(go())


@pytest.mark.parametrize(
    ("name", "how"),
    [
        ("model.weights.safetensors", "flip"),
        ("model.optim.safetensors", "truncate"),
        ("model.weights.safetensors", "delete"),
    ],
)
def test_bad_file_is_refused_and_restore_falls_back(run_url: str, name: str, how: str) -> None:
    old, old_opt = trained(3)
    put(run_url, "s3", 3, checkpoint_files(old, old_opt, 3))
    new, new_opt = trained(4)
    put(run_url, "s4", 4, checkpoint_files(new, new_opt, 4))
    _corrupt(run_url, "s4", name, how)
    with pytest.raises(IntegrityError, match=name.replace(".", r"\.")):
        load(run_url, "s4")
    with pytest.raises(IntegrityError, match=name.replace(".", r"\.")):
        verify(run_url, "s4")  # ``ckptd verify``: streamed from the store, no local copy
    assert verify(run_url, "s3").tag == "s3"
    fresh, fresh_opt = trained(9)
    meta = restore_into([run_url], model=fresh, optimizer=fresh_opt)
    assert meta is not None and meta["tag"] == "s3"
    same(fresh.state_dict(), old.state_dict())
    same(fresh_opt.state_dict(), old_opt.state_dict())


def test_model_laid_out_differently_still_restores(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A parameter that cannot take the stored bytes in place (another dtype, not contiguous)
    is restored through ``load_state_dict``, as before."""
    net, opt = trained(5)
    url = str(tmp_path / "run")
    put(url, "s5", 5, checkpoint_files(net, opt, 5))
    fresh = Net()
    fresh.b.weight = nn.Parameter(torch.zeros(64, 256).t().contiguous().t())  # strided view
    assert not fresh.b.weight.is_contiguous()
    restore_into([url], model=fresh)
    same(fresh.state_dict(), net.state_dict())


def test_local_read_takes_no_temp_file_and_one_buffer_per_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every tensor ``load`` returns is a view of its file's one buffer (no per-tensor copy)."""
    net, opt = trained(6)
    url = str(tmp_path / "run")
    put(url, "s6", 6, checkpoint_files(net, opt, 6))
    got = load(url)
    bases = {t.untyped_storage().data_ptr() for t in got["model"].values()}
    assert len(bases) == 1


def test_load_of_a_store_url_reads_the_daemon_roots_identical_copy(
    tmp_path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Local first: the root's copy is read when its manifest is the store's; the store's data
    files are not needed then. A root copy that fails verification falls back to the store; one
    whose manifest differs is not used at all."""
    import ckptd.reader

    root, store = str(tmp_path / "root"), f"s3://{s3_bucket}/pre"
    monkeypatch.setattr(ckptd.reader, "daemon_places", lambda: (root, store))
    net, opt = trained(8)
    files = checkpoint_files(net, opt, 8)
    put(f"{root}/run", "s8", 8, files)
    put(f"{store}/run", "s8", 8, files)
    _corrupt(f"{store}/run", "s8", "model.weights.safetensors", "delete")
    same(load(f"{store}/run")["model"], net.state_dict())  # only the root has the weights
    _corrupt(f"{root}/run", "s8", "model.weights.safetensors", "flip")
    with pytest.raises(IntegrityError, match="missing"):  # root fails, then the store does
        load(f"{store}/run")
    put(f"{store}/run", "s8", 8, files)
    same(load(f"{store}/run")["model"], net.state_dict())  # the store's intact copy
    put(f"{root}/run", "s8", 8, files)
    with open(f"{root}/run/checkpoints/s8/MANIFEST.json", "rb+") as f:
        doc = json.loads(f.read())
        doc["created"] = "2026-12-01T01:00:00Z"
        f.seek(0)
        f.truncate()
        f.write(json.dumps(doc).encode())
    _corrupt(f"{store}/run", "s8", "model.weights.safetensors", "delete")
    with pytest.raises(IntegrityError, match="missing"):  # another checkpoint: not a twin
        load(f"{store}/run")


@pytest.mark.slow
def test_ranks_of_a_node_read_a_store_checkpoint_once(
    tmp_path, s3_bucket: str, s3_proxy, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """With ``CKPTD_NODE_CACHE``, four ranks (threads here: ``flock`` locks are per open file,
    so they exclude each other as processes would) restoring the same checkpoint fetch each data
    file from the store once; every rank gets the exact state. A cached copy that no longer
    verifies is dropped and the store read again."""
    from concurrent.futures import ThreadPoolExecutor

    url = f"s3://{s3_bucket}/pre/run"
    net, opt = trained(12)
    put(url, "s12", 12, checkpoint_files(net, opt, 12))
    monkeypatch.setenv("CKPTD_NODE_CACHE", str(tmp_path / "cache"))
    before = len(s3_proxy.requests)

    def rank(_: int) -> tuple[Net, torch.optim.Optimizer]:
        fresh, fresh_opt = trained(13)
        restore_into([url], model=fresh, optimizer=fresh_opt)
        return fresh, fresh_opt

    with ThreadPoolExecutor(4) as pool:
        ranks = list(pool.map(rank, range(4)))
    for fresh, fresh_opt in ranks:
        same(fresh.state_dict(), net.state_dict())
        same(fresh_opt.state_dict(), opt.state_dict())
    weights = [r for r in s3_proxy.requests[before:] if "GET" in r and "weights" in r]
    assert len(weights) == 1  # one 16 MiB range covers the file: one GET for all four ranks
    # Corrupt the cached copy: the next restore drops it and reads the store.
    (entry,) = [p for p in (tmp_path / "cache").rglob("model.weights.safetensors")]
    data = bytearray(entry.read_bytes())
    data[-1] ^= 0xFF
    entry.write_bytes(bytes(data))
    fresh, _ = rank(0)
    same(fresh.state_dict(), net.state_dict())
    assert not entry.exists()


@pytest.mark.parametrize("mapped", ["1", "0"])
def test_a_local_load_maps_the_files_and_writes_never_reach_them(
    tmp_path, monkeypatch: pytest.MonkeyPatch, mapped: str
) -> None:  # type: ignore[no-untyped-def]
    """Local files are mapped copy-on-write (or read, with CKPTD_LOAD_MMAP=0): the tensors are
    bitwise equal, writable, and writing to them leaves the checkpoint as it was."""
    monkeypatch.setenv("CKPTD_LOAD_MMAP", mapped)
    net, opt = trained(8)
    url = str(tmp_path / "run")
    put(url, "s8", 8, checkpoint_files(net, opt, 8))
    got = load(url)
    same(got["model"], net.state_dict())
    got["model"]["a.weight"].add_(1.0)
    got["optimizer"]["state"][0]["exp_avg"].zero_()
    assert verify(url)  # the files on disk are untouched
    again = load(url)
    same(again["model"], net.state_dict())
    same(again["optimizer"], opt.state_dict())


def test_a_local_file_changed_on_disk_is_refused_before_it_is_mapped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    net, opt = trained(9)
    url = str(tmp_path / "run")
    put(url, "s9", 9, checkpoint_files(net, opt, 9))
    path = tmp_path / "run" / "checkpoints" / "s9" / "model.weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="CRC32C"):
        load(url, tag="s9")
