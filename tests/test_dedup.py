"""Incremental checkpoints (issue 15): bitwise round trips of models with a frozen part, and the
frozen bytes written and uploaded once.

A real daemon process per test, the moto S3 server (or a local store) behind it. What is
asserted is what a user or an operator would see: the objects in the bucket, the files and
inodes in the daemon's root, tensors loaded back bit for bit, the CLI's exit codes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any

import pytest
import safetensors
import torch

import ckptd
from ckptd import Checkpointer
from tests.dedupkit import (
    FROZEN,
    WEIGHTS,
    S3View,
    blobs_of,
    cli_quiet,
    digest,
    local_manifests,
    local_shared,
    peft,
    state_of,
    tag,
    train,
)
from tests.helpers import Net, bitwise_equal, train_steps, until

OPTIM = "model.optim.safetensors"


def _safetensors_keys(path: str) -> set[str]:
    with safetensors.safe_open(path, framework="pt") as f:
        return set(f.keys())


def _check_dest(dest: str, manifest: dict[str, Any]) -> None:
    """A restored directory is self-contained: every listed file under its own name, each at its
    listed size, safetensors files open with the safetensors library, the manifest there."""
    names = set(os.listdir(dest))
    assert names == {*manifest["files"], "MANIFEST.json"}, names
    for name, rec in manifest["files"].items():
        path = os.path.join(dest, name)
        assert os.path.isfile(path) and not os.path.islink(path)
        assert os.path.getsize(path) == rec["size"], name
        if name.endswith(".safetensors"):
            assert _safetensors_keys(path), name
    assert cli_quiet(["verify", dest]) == 0


# ---- round trips ---------------------------------------------------------------------------------


def test_peft_round_trips_bitwise_through_every_reader(
    s3_bucket: str, s3_server: str, make_daemon: Any, tmp_path: Any
) -> None:
    store = f"s3://{s3_bucket}/rt"
    view = S3View(s3_server, s3_bucket, "rt", "peft")
    d = make_daemon(store=store, name="a")
    model, opt = peft(0)
    train(model, opt, 3, seed=1)
    expect = state_of(model, opt)
    frozen_names = set(model.frozen())
    with Checkpointer("peft", socket=d.socket) as ckpt:
        ckpt.save(3, model=model, optimizer=opt, extra={"note": "x"}).wait("uploaded", 60)

    # The split: frozen parameters in their own file, everything else in the weights file.
    ck = os.path.join(d.root, "peft", "checkpoints", tag(3))
    assert set(os.listdir(ck)) == {WEIGHTS, FROZEN, OPTIM, "extra.msgpack", "MANIFEST.json"}
    assert _safetensors_keys(os.path.join(ck, FROZEN)) == frozen_names
    weights_keys = _safetensors_keys(os.path.join(ck, WEIGHTS))
    assert not weights_keys & frozen_names
    assert {"scale", "head.weight", "adapters.0.A"} <= weights_keys  # buffers stay here

    # The tag dir in the root is self-contained: copied anywhere, it loads and verifies.
    copy = str(tmp_path / "copied-tag-dir")
    shutil.copytree(ck, copy)
    assert cli_quiet(["verify", copy]) == 0
    assert bitwise_equal(ckptd.load(copy)["model"], expect["model"])

    # ckptd.load merges the two files: the user sees one state dict, bit for bit.
    for url in (os.path.join(d.root, "peft"), view.url):
        state = ckptd.load(url)
        assert set(state["model"]) == set(expect["model"])
        assert bitwise_equal(state["model"], expect["model"]), url
        assert bitwise_equal(state["optimizer"], expect["optimizer"]), url
        assert state["extra"] == {"note": "x"}

    # The machine is gone: a fresh daemon on a fresh root, a fresh model, from the store only.
    d.kill()
    shutil.rmtree(d.root)
    fresh = make_daemon(store=store, name="fresh")
    model2, opt2 = peft(99)
    with Checkpointer("peft", socket=fresh.socket) as ckpt:
        meta = ckpt.restore(model2, opt2)
    assert meta is not None and meta["step"] == 3
    assert bitwise_equal(model2.state_dict(), expect["model"])
    assert bitwise_equal(opt2.state_dict(), expect["optimizer"])
    assert {n for n, p in model2.named_parameters() if not p.requires_grad} == frozen_names
    assert train(model, opt, 2, seed=7) == train(model2, opt2, 2, seed=7)  # resumes identically

    # ckptd restore materializes a self-contained directory; ckptd verify accepts both.
    dest = str(tmp_path / "dest")
    assert cli_quiet(["restore", f"{view.url}@{tag(3)}", dest]) == 0
    manifest = view.manifests()[tag(3)]
    _check_dest(dest, manifest)
    assert "shared" not in os.listdir(dest)
    with open(os.path.join(dest, FROZEN), "rb") as f:
        assert digest(f.read()) == manifest["files"][FROZEN]["blob"]
    assert bitwise_equal(ckptd.load(dest)["model"], expect["model"])
    assert cli_quiet(["verify", f"{view.url}@{tag(3)}"]) == 0


@pytest.mark.parametrize("kind", ["plain", "partly-frozen", "tied-frozen"])
def test_plain_and_partly_frozen_models_round_trip_bitwise(
    kind: str, make_daemon: Any, tmp_path: Any
) -> None:
    """A plain model (all trainable) keeps the one-file layout; a model with a frozen layer
    (tied weights trainable) or a frozen tied embedding/head splits, and the tie and the
    frozen flags survive a restore."""
    store = str(tmp_path / "store")
    d = make_daemon(store=store, name="a")

    def make(seed: int) -> tuple[Net, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        m = Net()
        if kind == "partly-frozen":
            m.body[0].requires_grad_(False)
        elif kind == "tied-frozen":
            m.embed.requires_grad_(False)  # head.weight is the same parameter
        return m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)

    model, opt = make(0)
    with Checkpointer("net", socket=d.socket) as ckpt:
        for step in (1, 2):
            train_steps(model, opt, 2, seed=step)
            ckpt.save(step, model=model, optimizer=opt).wait("uploaded", 60)
    expect = state_of(model, opt)
    ck = os.path.join(d.root, "net", "checkpoints", tag(2))
    frozen = {"plain": set(), "partly-frozen": {"body.0.weight", "body.0.bias"},
              "tied-frozen": {"embed.weight"}}[kind]  # fmt: skip
    if kind == "plain":
        assert FROZEN not in os.listdir(ck)
        assert not os.path.exists(os.path.join(store, "net", "shared"))
    else:
        assert _safetensors_keys(os.path.join(ck, FROZEN)) == frozen  # a tie is stored once
        assert not _safetensors_keys(os.path.join(ck, WEIGHTS)) & {*frozen, "head.weight"}
        blobs = blobs_of(local_manifests(store, "net"))
        assert {
            f"{local_manifests(store, 'net')[tag(2)]['files'][FROZEN]['blob']}.safetensors"
        } <= blobs
        assert set(os.listdir(os.path.join(store, "net", "shared"))) == blobs
    state = ckptd.load(os.path.join(store, "net"))
    assert bitwise_equal(state["model"], expect["model"])
    assert bitwise_equal(state["optimizer"], expect["optimizer"])

    d.kill()
    shutil.rmtree(d.root)
    fresh = make_daemon(store=store, name="fresh")
    model2, opt2 = make(5)
    with Checkpointer("net", socket=fresh.socket) as ckpt:
        meta = ckpt.restore(model2, opt2)
    assert meta is not None and meta["step"] == 2
    assert model2.head.weight is model2.embed.weight
    assert bitwise_equal(model2.state_dict(), expect["model"])
    assert bitwise_equal(opt2.state_dict(), expect["optimizer"])
    assert {n for n, p in model2.named_parameters() if not p.requires_grad} == frozen
    assert train_steps(model, opt, 2, seed=9) == train_steps(model2, opt2, 2, seed=9)
    dest = str(tmp_path / "dest")
    assert cli_quiet(["restore", os.path.join(store, "net"), dest]) == 0
    _check_dest(dest, local_manifests(store, "net")[tag(2)])
    if kind != "plain":  # a copy, never a link of the store's blob (editing it harms nothing)
        blob = local_manifests(store, "net")[tag(2)]["files"][FROZEN]["blob"]
        store_blob = os.stat(os.path.join(store, "net", "shared", f"{blob}.safetensors"))
        assert os.stat(os.path.join(dest, FROZEN)).st_ino != store_blob.st_ino


# ---- dedup ---------------------------------------------------------------------------------------


def _shared_writes(proxy: Any) -> list[str]:
    """Requests that wrote bytes under a ``/shared/`` key (not the listings or HEADs)."""
    ops = ("PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload")
    return [f"{c.op} {c.path}" for c in proxy.calls if c.op in ops and "/shared/" in c.path]


def test_the_frozen_part_is_written_and_uploaded_once(
    s3_proxy: Any, s3_bucket: str, s3_server: str, make_daemon: Any, capsys: Any
) -> None:
    view = S3View(s3_server, s3_bucket, "dd", "lora")
    d = make_daemon(store=f"s3://{s3_bucket}/dd", args=["--keep-local", "all"])
    model, opt = peft(0)
    steps = (1, 2, 3, 4)
    with Checkpointer("lora", socket=d.socket) as ckpt:
        for step in steps:
            train(model, opt, 1, seed=step)
            ckpt.save(step, model=model, optimizer=opt).wait("uploaded", 60)
            if step == 1:
                first_writes = _shared_writes(s3_proxy)
                assert first_writes, "the first save uploaded no blob"
            else:
                assert _shared_writes(s3_proxy) == first_writes, f"step {step} uploaded again"
        status = ckpt.status()
    expect = state_of(model, opt)

    manifests = view.manifests()
    assert sorted(manifests) == [tag(s) for s in steps]
    frozen = {m["files"][FROZEN]["blob"] for m in manifests.values()}
    assert len(frozen) == 1
    (blob,) = frozen
    size = manifests[tag(1)]["files"][FROZEN]["size"]
    # The store: one blob in shared/ (the frozen file), none of it under checkpoints/.
    assert view.shared() == {f"{blob}.safetensors": size}
    assert not [k for k in view.objects("checkpoints/") if k.endswith(FROZEN)]
    assert blobs_of(manifests) == {f"{blob}.safetensors"}  # the trained weights are not blobs

    # The root: one blob file, and in each tag dir a hard link of it under its listed name.
    shared = local_shared(d.root, "lora")
    assert set(shared) == {f"{blob}.safetensors"}
    ino = shared[f"{blob}.safetensors"].st_ino
    for step in steps:
        st = os.stat(os.path.join(d.root, "lora", "checkpoints", tag(step), FROZEN))
        assert st.st_ino == ino, step
    assert shared[f"{blob}.safetensors"].st_nlink == 1 + len(steps)
    with open(os.path.join(d.root, "lora", "shared", f"{blob}.safetensors"), "rb") as f:
        data = f.read()
    assert len(data) == size and digest(data) == blob  # content identity: BLAKE3 of the file

    # What the daemon and ckptd ls say about it.
    deduped = status.get("bytes_deduped", status.get("stats", {}).get("bytes_deduped"))
    assert deduped is not None and deduped >= (len(steps) - 1) * size, status
    jobs = {j["tag"]: j for j in status["jobs"] if j["run"] == "lora"}
    assert set(jobs) & {tag(s) for s in steps[1:]}, jobs.keys()
    for t, j in jobs.items():  # bytes this save wrote: all at step 1, all but the base later
        assert j["bytes_new"] == j["bytes_total"] - (0 if t == tag(1) else size), j
    capsys.readouterr()
    assert cli_quiet(["ls", view.url, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [r["tag"] for r in rows] == [tag(s) for s in steps]
    totals = [sum(int(f["size"]) for f in manifests[r["tag"]]["files"].values()) for r in rows]
    assert [r["total_bytes"] for r in rows] == totals
    assert rows[0]["new_bytes"] == totals[0]
    assert [r["new_bytes"] for r in rows[1:]] == [t - size for t in totals[1:]]
    assert cli_quiet(["ls", view.url]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["TAG", "STEP", "SIZE", "NEW"] and len(table) == 1 + len(steps)
    for step in steps:
        assert cli_quiet(["verify", f"{view.url}@{tag(step)}"]) == 0
    assert bitwise_equal(ckptd.load(view.url)["model"], expect["model"])


def test_dedup_false_keeps_the_single_file_layout(make_daemon: Any, tmp_path: Any) -> None:
    store = str(tmp_path / "store")
    d = make_daemon(store=store)
    model, opt = peft(0)
    with Checkpointer("old", socket=d.socket, dedup=False) as ckpt:
        for step in (1, 2):
            train(model, opt, 1, seed=step)
            ckpt.save(step, model=model, optimizer=opt).wait("uploaded", 60)
    expect = state_of(model, opt)
    for where in (d.root, store):
        ms = local_manifests(where, "old")
        assert sorted(ms) == [tag(1), tag(2)]
        for t, m in ms.items():
            assert set(m["files"]) == {WEIGHTS, OPTIM}, where
            assert not blobs_of({t: m}), m["files"]
            keys = _safetensors_keys(os.path.join(where, "old", "checkpoints", t, WEIGHTS))
            assert set(model.frozen()) <= keys
        assert not os.path.exists(os.path.join(where, "old", "shared"))
    state = ckptd.load(os.path.join(store, "old"))
    assert bitwise_equal(state["model"], expect["model"])
    with pytest.raises(ckptd.ConfigError, match="skip_unchanged"):
        Checkpointer("old", socket=d.socket, dedup=False, skip_unchanged=True)


# ---- a frozen tensor that changes --------------------------------------------------------------


@pytest.mark.parametrize("skip_unchanged", [False, True])
def test_a_frozen_tensor_changed_in_place_is_saved_again(
    skip_unchanged: bool, s3_bucket: str, s3_server: str, make_daemon: Any
) -> None:
    view = S3View(s3_server, s3_bucket, "ip", "chg")
    d = make_daemon(store=f"s3://{s3_bucket}/ip", args=["--keep-local", "all"])
    model, opt = peft(0)
    w = model.base[0].weight
    snapshots: dict[int, dict[str, Any]] = {}
    with Checkpointer("chg", socket=d.socket, skip_unchanged=skip_unchanged) as ckpt:
        for step in (1, 2, 3, 4):
            train(model, opt, 1, seed=step)
            if step == 2:
                with torch.no_grad():
                    w.mul_(2)  # the frozen base changes in place: new content
            if step == 4:
                with torch.no_grad():
                    w.mul_(1)  # the version counter moves, the content does not
            ckpt.save(step, model=model, optimizer=opt).wait("uploaded", 60)
            snapshots[step] = state_of(model)["model"]
    assert not torch.equal(snapshots[1]["base.0.weight"], snapshots[2]["base.0.weight"])

    manifests = view.manifests()
    b = {s: manifests[tag(s)]["files"][FROZEN]["blob"] for s in (1, 2, 3, 4)}
    assert b[1] != b[2], "the changed frozen tensor was not saved again"
    assert b[2] == b[3] == b[4]  # unchanged since: the same blob, by content
    frozen_blobs = {f"{b[1]}.safetensors", f"{b[2]}.safetensors"}
    assert frozen_blobs <= set(view.shared())  # both versions of the base are in the store
    assert set(view.shared()) == blobs_of(manifests)
    for step, snap in snapshots.items():
        state = ckptd.load(os.path.join(d.root, "chg"), tag=tag(step))
        assert bitwise_equal(state["model"], snap), step
    for step in (1, 2):  # the store's copies: both bases
        assert bitwise_equal(ckptd.load(view.url, tag=tag(step))["model"], snapshots[step])
        assert cli_quiet(["verify", f"{view.url}@{tag(step)}"]) == 0
    assert frozen_blobs <= set(local_shared(d.root, "chg"))


def test_writes_that_bypass_the_version_counter_are_caught_by_the_hash(
    make_daemon: Any, tmp_path: Any
) -> None:
    """Without skip_unchanged, identity is the content hash: a write through ``.data`` or a
    numpy view (the version counter does not move) is still saved."""
    store = str(tmp_path / "store")
    d = make_daemon(store=store)
    model, opt = peft(0)
    snapshots = {}
    with Checkpointer("bypass", socket=d.socket) as ckpt:
        ckpt.save(1, model=model, optimizer=opt).wait("uploaded", 60)
        snapshots[1] = state_of(model)["model"]
        model.base[1].weight.data.copy_(torch.ones_like(model.base[1].weight))
        ckpt.save(2, model=model, optimizer=opt).wait("uploaded", 60)
        snapshots[2] = state_of(model)["model"]
        model.base[2].bias.detach().numpy()[:] = 3.0
        ckpt.save(3, model=model, optimizer=opt).wait("uploaded", 60)
        snapshots[3] = state_of(model)["model"]
    ms = local_manifests(store, "bypass")
    assert len({m["files"][FROZEN]["blob"] for m in ms.values()}) == 3
    for step, snap in snapshots.items():
        assert bitwise_equal(
            ckptd.load(os.path.join(store, "bypass"), tag=tag(step))["model"], snap
        )
    assert set(os.listdir(os.path.join(store, "bypass", "shared"))) == blobs_of(ms)


# ---- staging skip --------------------------------------------------------------------------------


def test_skip_unchanged_does_not_stage_an_unchanged_frozen_part(
    make_daemon: Any, tmp_path: Any
) -> None:
    """With skip_unchanged=True a save whose frozen tensors did not move copies only the rest;
    what it writes is still complete and bitwise right."""
    store = str(tmp_path / "store")
    d = make_daemon(store=store, args=["--keep-local", "all"])
    model, opt = peft(0)
    frozen_bytes = sum(p.numel() * p.element_size() for p in model.frozen().values())
    staged: list[int] = []
    reused: list[dict[str, str]] = []
    with Checkpointer("skip", socket=d.socket, skip_unchanged=True) as ckpt:
        stage = ckpt._stager.stage

        def counted(plan: Any, slot: Any) -> Any:
            staged.append(sum(int(f.data_size) for f in plan.files if f.reuse is None))
            reused.append({f.name: f.reuse for f in plan.files if f.reuse is not None})
            return stage(plan, slot)

        ckpt._stager.stage = counted  # type: ignore[method-assign]
        for step in (1, 2, 3):
            train(model, opt, 1, seed=step)
            ckpt.save(step, model=model, optimizer=opt).wait("uploaded", 60)
    expect = state_of(model, opt)
    assert len(staged) == 3
    assert staged[0] >= frozen_bytes
    assert staged[1] <= staged[0] - frozen_bytes and staged[2] <= staged[0] - frozen_bytes, staged
    ms = local_manifests(store, "skip")
    (blob,) = {m["files"][FROZEN]["blob"] for m in ms.values()}
    assert reused[0] == {} and reused[1][FROZEN] == blob and reused[2][FROZEN] == blob, reused
    state = ckptd.load(os.path.join(store, "skip"))
    assert bitwise_equal(state["model"], expect["model"])
    assert bitwise_equal(state["optimizer"], expect["optimizer"])
    assert cli_quiet(["verify", os.path.join(store, "skip")]) == 0


# ---- a corrupt blob --------------------------------------------------------------------------------


def _flip(data: bytes) -> bytes:
    """Same size, one byte wrong: only the checksum can tell."""
    out = bytearray(data)
    out[len(out) - 5] ^= 0xFF
    return bytes(out)


@pytest.mark.parametrize("where", ["store", "root"])
def test_a_corrupt_blob_fails_every_checkpoint_that_lists_it(
    where: str, s3_bucket: str, s3_server: str, make_daemon: Any, capsys: Any
) -> None:
    store = f"s3://{s3_bucket}/bad"
    view = S3View(s3_server, s3_bucket, "bad", "cor")
    d = make_daemon(store=store, args=["--keep-local", "all"], name="a")
    model, opt = peft(0)
    snaps = {}
    with Checkpointer("cor", socket=d.socket) as ckpt:
        for step in (1, 2, 3):
            train(model, opt, 1, seed=step)
            if step == 2:
                with torch.no_grad():
                    model.base[2].weight.mul_(2)  # steps 2 and 3 use a new base blob
            ckpt.save(step, model=model, optimizer=opt).wait("uploaded", 60)
            snaps[step] = state_of(model, opt)
    ms = view.manifests()
    old, new = ms[tag(1)]["files"][FROZEN]["blob"], ms[tag(2)]["files"][FROZEN]["blob"]
    assert old != new and ms[tag(3)]["files"][FROZEN]["blob"] == new
    key = f"{new}.safetensors"
    if where == "store":
        view.put(f"shared/{key}", _flip(view.get(f"shared/{key}")))
        url = view.url
    else:
        path = os.path.join(d.root, "cor", "shared", key)
        os.chmod(path, 0o600)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "r+b") as f:  # in place: every hard link of it sees the damage
            f.write(_flip(data))
        url = os.path.join(d.root, "cor")
    capsys.readouterr()
    for step in (2, 3):
        assert cli_quiet(["verify", f"{url}@{tag(step)}"]) == 1, step
        err = capsys.readouterr().err
        assert FROZEN in err or key in err, err  # it names the bad file
    assert cli_quiet(["verify", f"{url}@{tag(1)}"]) == 0
    with pytest.raises(ckptd.IntegrityError, match=FROZEN.replace(".", r"\.")):
        ckptd.load(url, tag=tag(3))

    from ckptd.reader import load_newest

    newest = load_newest([url])
    assert newest is not None and newest["meta"]["step"] == 1
    assert bitwise_equal(newest["model"], snaps[1]["model"])

    # Checkpointer.restore of latest: the newest checkpoint that verifies. With the store's blob
    # bad and the root gone, that is step 1; with the root's bad, the store's step 3.
    if where == "store":
        d.kill()
        shutil.rmtree(d.root)
        d = make_daemon(store=store, name="fresh")
    want = 1 if where == "store" else 3
    model2, opt2 = peft(9)
    with Checkpointer("cor", socket=d.socket) as ckpt:
        meta = ckpt.restore(model2, opt2)
    assert meta is not None and meta["step"] == want
    assert bitwise_equal(model2.state_dict(), snaps[want]["model"])
    assert bitwise_equal(opt2.state_dict(), snaps[want]["optimizer"])


def test_ckptd_restore_of_latest_falls_back_past_a_corrupt_blob(
    make_daemon: Any, tmp_path: Any, capsys: Any
) -> None:
    """``ckptd restore URL DEST`` (latest) when the newest checkpoints list a corrupt blob: the
    newest checkpoint that verifies, as ``Checkpointer.restore`` does (spec: restore of
    "latest" falls back)."""
    store = str(tmp_path / "store")
    d = make_daemon(store=store)
    model, opt = peft(0)
    train(model, opt, 1, seed=3)  # an optimizer with state: every file has tensors
    with Checkpointer("cr", socket=d.socket) as ckpt:
        ckpt.save(1, model=model, optimizer=opt).wait("uploaded", 60)
        with torch.no_grad():
            model.base[2].weight.mul_(2)
        ckpt.save(2, model=model, optimizer=opt).wait("uploaded", 60)
    run = os.path.join(store, "cr")
    new = local_manifests(store, "cr")[tag(2)]["files"][FROZEN]["blob"]
    path = os.path.join(run, "shared", f"{new}.safetensors")
    os.chmod(path, 0o600)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(_flip(data))
    assert cli_quiet(["verify", f"{run}@{tag(2)}"]) == 1
    dest = str(tmp_path / "dest")
    code = cli_quiet(["restore", run, dest])
    assert code == 0, capsys.readouterr().err
    with open(os.path.join(dest, "MANIFEST.json")) as f:
        assert json.load(f)["tag"] == tag(1)
    _check_dest(dest, local_manifests(store, "cr")[tag(1)])


# ---- edges ---------------------------------------------------------------------------------------


def test_two_models_with_one_base_in_one_save_store_it_once(
    s3_proxy: Any, s3_bucket: str, s3_server: str, make_daemon: Any
) -> None:
    """Two fine-tunes of one base saved together: two listed files, one blob, one upload."""
    view = S3View(s3_server, s3_bucket, "two", "pair")
    d = make_daemon(store=f"s3://{s3_bucket}/two")
    a, opt_a = peft(0)
    b, opt_b = peft(0)
    train(b, opt_b, 2, seed=5)  # other adapters, the same frozen base
    with Checkpointer("pair", socket=d.socket) as ckpt:
        for step in (1, 2):
            train(a, opt_a, 1, seed=step)
            ckpt.save(step, models={"a": a, "b": b}, optimizers={"a": opt_a, "b": opt_b}).wait(
                "uploaded", 60
            )
    ms = view.manifests()
    recs = [ms[tag(s)]["files"][f"{m}.frozen.safetensors"] for s in (1, 2) for m in "ab"]
    assert len({r["blob"] for r in recs}) == 1
    blob = recs[0]["blob"]
    assert view.shared()[f"{blob}.safetensors"] == recs[0]["size"]
    assert set(view.shared()) == blobs_of(ms)
    assert not [k for k in view.objects("checkpoints/") if ".frozen." in k]
    assert len([c for c in s3_proxy.calls if c.op == "PutObject" and blob in c.path]) == 1
    shared = local_shared(d.root, "pair")
    ck = os.path.join(d.root, "pair", "checkpoints", tag(2))
    for m in "ab":
        st = os.stat(os.path.join(ck, f"{m}.frozen.safetensors"))
        assert st.st_ino == shared[f"{blob}.safetensors"].st_ino
    state = ckptd.load(view.url)
    assert bitwise_equal(state["a"], a.state_dict()) and bitwise_equal(state["b"], b.state_dict())
    assert cli_quiet(["verify", view.url]) == 0


def test_unfreezing_a_layer_mid_run_keeps_every_checkpoint_whole(
    make_daemon: Any, tmp_path: Any
) -> None:
    """The split follows requires_grad at each save; a restore does not depend on the target
    model's flags matching the saved split."""
    store = str(tmp_path / "store")
    d = make_daemon(store=store)
    model, opt = peft(0)
    snaps = {}
    with Checkpointer("thaw", socket=d.socket) as ckpt:
        ckpt.save(1, model=model, optimizer=opt).wait("uploaded", 60)
        snaps[1] = state_of(model, opt)
        model.base[0].requires_grad_(True)
        opt.add_param_group({"params": list(model.base[0].parameters()), "lr": 1e-3})
        train(model, opt, 1, seed=2)
        ckpt.save(2, model=model, optimizer=opt).wait("uploaded", 60)
        snaps[2] = state_of(model, opt)
    run = os.path.join(store, "thaw")
    ck2 = os.path.join(d.root, "thaw", "checkpoints", tag(2))
    frozen2 = _safetensors_keys(os.path.join(ck2, FROZEN))
    assert "base.0.weight" not in frozen2 and "base.1.weight" in frozen2
    assert "base.0.weight" in _safetensors_keys(os.path.join(ck2, WEIGHTS))
    for step in (1, 2):
        assert bitwise_equal(ckptd.load(run, tag=tag(step))["model"], snaps[step]["model"])
    # Step 1 (base.0 frozen then) into a model where everything is trainable, and back.
    thawed, _ = peft(3)
    thawed.requires_grad_(True)
    with Checkpointer("thaw", socket=d.socket) as ckpt:
        meta = ckpt.restore(thawed, tag=tag(1))
        assert meta is not None and bitwise_equal(thawed.state_dict(), snaps[1]["model"])
        model2, opt2 = peft(4)
        model2.base[0].requires_grad_(True)
        opt2.add_param_group({"params": list(model2.base[0].parameters()), "lr": 1e-3})
        ckpt.restore(model2, opt2)
    assert bitwise_equal(model2.state_dict(), snaps[2]["model"])
    assert bitwise_equal(opt2.state_dict(), snaps[2]["optimizer"])


def test_skip_unchanged_after_the_daemon_was_replaced_saves_a_whole_checkpoint(
    make_daemon: Any, tmp_path: Any
) -> None:
    """A blob the old daemon confirmed is not one a new daemon on a fresh root holds: the
    client must stage the unchanged file again rather than refer to it."""
    d = make_daemon(name="a")
    model, opt = peft(0)
    with Checkpointer("swap", socket=d.socket, skip_unchanged=True) as ckpt:
        ckpt.save(1, model=model, optimizer=opt).wait("uploaded", 60)
        d.kill()
        fresh = make_daemon(name="b", root=str(tmp_path / "root-b"))
        os.replace(fresh.socket, d.socket)  # the same socket path, a new daemon behind it
        train(model, opt, 1, seed=2)
        until(lambda: not ckpt._conn.alive, 10, "the client to see the old daemon gone")  # type: ignore[union-attr]
        ckpt.save(2, model=model, optimizer=opt).wait("uploaded", 60)
    expect = state_of(model, opt)
    run = os.path.join(fresh.root, "swap")
    assert sorted(local_manifests(fresh.root, "swap")) == [tag(2)]
    assert cli_quiet(["verify", run]) == 0
    state = ckptd.load(run)
    assert bitwise_equal(state["model"], expect["model"])
    assert bitwise_equal(state["optimizer"], expect["optimizer"])


def test_a_plain_state_dict_stores_its_unchanged_tensors_once(
    make_daemon: Any, tmp_path: Any
) -> None:
    """Lightning hands ckptd ``state_dict()`` (tensors without ``requires_grad``): from the
    second save on, the tensors that did not change are stored apart and once."""
    store = str(tmp_path / "store")
    d = make_daemon(store=store)
    model, opt = peft(0)
    with Checkpointer("dict", socket=d.socket) as ckpt:
        for step in (1, 2, 3):
            train(model, opt, 1, seed=step)
            sd = model.state_dict()
            ckpt.save(step, model=sd, optimizer=opt.state_dict()).wait("uploaded", 60)
    ms = local_manifests(store, "dict")
    assert FROZEN not in ms[tag(1)]["files"]  # nothing is known to be stable at the first save
    assert ms[tag(2)]["files"][FROZEN]["blob"] == ms[tag(3)]["files"][FROZEN]["blob"]
    keys = _safetensors_keys(os.path.join(store, "dict", "checkpoints", tag(3), WEIGHTS))
    assert not set(model.frozen()) & keys  # the frozen base is not in the weights file
    assert len(os.listdir(os.path.join(store, "dict", "shared"))) == 1
    assert bitwise_equal(ckptd.load(os.path.join(store, "dict"))["model"], model.state_dict())


def test_a_models_files_decode_together_whatever_order_they_arrive_in() -> None:
    """The GPU load decodes files as their reads finish: a weights file that lands before its
    frozen part waits for it (the CPU side of ``reader._load_to_cuda``)."""
    from ckptd.reader import ModelGroups

    files = {WEIGHTS: {}, FROZEN: {}, OPTIM: {}, "extra.msgpack": {}}
    groups = ModelGroups(files)
    assert groups.arrived(OPTIM, 1) == [(OPTIM, 1)]
    assert groups.arrived(WEIGHTS, 2) == []
    assert groups.arrived("extra.msgpack", 3) == [("extra.msgpack", 3)]
    assert groups.arrived(FROZEN, 4) == [(FROZEN, 4), (WEIGHTS, 2)]
    alone = ModelGroups({WEIGHTS: {}})
    assert alone.arrived(WEIGHTS, 5) == [(WEIGHTS, 5)]


def test_a_reference_to_a_blob_the_root_lost_fails_that_save_alone(
    make_daemon: Any, tmp_path: Any
) -> None:
    """skip_unchanged refers to a blob that someone removed from the root: that save fails
    with a clear error, the daemon serves on, and the next save stages everything again."""
    d = make_daemon()
    model, opt = peft(0)
    with Checkpointer("lost", socket=d.socket, skip_unchanged=True) as ckpt:
        ckpt.save(1, model=model, optimizer=opt).wait("committed", 60)
        shared = os.path.join(d.root, "lost", "shared")
        for name in os.listdir(shared):
            os.unlink(os.path.join(shared, name))
        train(model, opt, 1, seed=2)
        h = ckpt.save(2, model=model, optimizer=opt)
        with pytest.raises(ckptd.SaveError, match="no longer in the daemon's root"):
            h.wait("committed", 60)
        with contextlib.suppress(ckptd.SaveError):
            ckpt.check()  # the failure is reported once
        train(model, opt, 1, seed=3)
        ckpt.save(3, model=model, optimizer=opt).wait("committed", 60)
    assert sorted(local_manifests(d.root, "lost")) == [tag(1), tag(3)]
    state = ckptd.load(os.path.join(d.root, "lost"))
    assert bitwise_equal(state["model"], state_of(model, opt)["model"])


def test_a_manifest_whose_blob_is_not_a_digest_is_refused() -> None:
    from ckptd.errors import IntegrityError
    from ckptd.manifest import validate

    good = {"tag": "t", "step": 1, "files": {FROZEN: {"size": 1, "crc32c": "00000000"}}}
    validate(good, tag="t")
    for blob in ("../../etc/passwd", "A" * 64, "0" * 63, 7, None):
        bad = {**good, "files": {FROZEN: {"size": 1, "crc32c": "00000000", "blob": blob}}}
        with pytest.raises(IntegrityError, match="content digest"):
            validate(bad, tag="t")
