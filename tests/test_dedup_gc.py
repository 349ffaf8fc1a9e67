"""Retention and gc by reference (issue 15): a blob is deleted only when no remaining manifest
lists it, in the store and in the daemon's root, while saves keep coming; ``ckptd gc`` does the
same on a store. Real daemon, the moto S3 server; a watcher thread checks all along that no
manifest in the store lists a blob the store does not hold.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

import ckptd
from ckptd import Checkpointer
from tests.dedupkit import (
    FROZEN,
    S3View,
    StoreWatch,
    back_to_a_base,
    blobs_of,
    cli_quiet,
    drain,
    hold_proxy,
    local_manifests,
    local_shared,
    peft,
    state_of,
    tag,
    train,
)
from tests.helpers import bitwise_equal, until

N = 9
# The frozen base over the run: A for steps 1-3, B for 4-6, A again at 7 (B halved back,
# exactly), C for 8-9. With keep-last 3, steps 7-9 remain: blobs A and C; B goes; A was
# unreferenced for a while (retention may delete it) and is needed again at step 7.
CHANGES = {4: 2.0, 7: 0.5, 8: 3.0}


@pytest.mark.parametrize("skip_unchanged", [False, True])
def test_keep_last_under_concurrent_saves_keeps_exactly_the_listed_blobs(
    skip_unchanged: bool, s3_bucket: str, s3_server: str, make_daemon: Any
) -> None:
    view = S3View(s3_server, s3_bucket, "gc", "ret")
    d = make_daemon(
        store=f"s3://{s3_bucket}/gc",
        args=["--keep-last", "3", "--keep-local", "2", "--blob-grace", "0"],
    )
    model, opt = peft(0)
    w = model.base[0].weight
    snaps: dict[int, dict[str, Any]] = {}
    watch = StoreWatch(view)
    try:
        with Checkpointer("ret", socket=d.socket, skip_unchanged=skip_unchanged) as ckpt:
            handles = []
            for step in range(1, N + 1):  # no waiting between saves
                train(model, opt, 1, seed=step)
                if step in CHANGES:
                    with torch.no_grad():
                        w.mul_(CHANGES[step])
                handles.append(ckpt.save(step, model=model, optimizer=opt))
                snaps[step] = state_of(model)["model"]  # CPU staging copied it already
            for h in handles:
                h.wait("uploaded", 120)
            drain(ckpt)

            kept = [tag(s) for s in (7, 8, 9)]

            def settled() -> bool:
                ms = view.manifests()
                return sorted(ms) == kept and set(view.shared()) == blobs_of(ms)

            until(settled, 30, "store retention to settle")
            until(
                lambda: (
                    sorted(local_manifests(d.root, "ret")) == kept[1:]
                    and set(local_shared(d.root, "ret")) == blobs_of(local_manifests(d.root, "ret"))
                ),
                30,
                "local retention to settle",
            )
    finally:
        checks, violations = watch.stop()
    assert checks > 0 and not violations, violations[:3]

    ms = view.manifests()
    blob = {s: ms[tag(s)]["files"][FROZEN]["blob"] for s in (7, 8, 9)}
    assert blob[7] != blob[8] == blob[9]
    assert set(view.shared()) == {f"{blob[7]}.safetensors", f"{blob[8]}.safetensors"}
    for step in (7, 8, 9):
        assert cli_quiet(["verify", f"{view.url}@{tag(step)}"]) == 0, step
        assert bitwise_equal(ckptd.load(view.url, tag=tag(step))["model"], snaps[step])
    # The root keeps 2: step 7's blob (A) went with step 7's local copy; C stays, linked.
    shared = local_shared(d.root, "ret")
    assert set(shared) == {f"{blob[8]}.safetensors"}
    for step in (8, 9):
        st = os.stat(os.path.join(d.root, "ret", "checkpoints", tag(step), FROZEN))
        assert st.st_ino == shared[f"{blob[8]}.safetensors"].st_ino
        assert cli_quiet(["verify", f"{os.path.join(d.root, 'ret')}@{tag(step)}"]) == 0


@pytest.mark.parametrize("kind", ["s3", "local"])
def test_gc_keep_last_deletes_unreferenced_blobs_and_keeps_referenced_ones(
    kind: str, s3_bucket: str, s3_server: str, make_daemon: Any, tmp_path: Any, capsys: Any
) -> None:
    if kind == "s3":
        view: S3View | None = S3View(s3_server, s3_bucket, "gcl", "g")
        store = f"s3://{s3_bucket}/gcl"
    else:
        view, store = None, str(tmp_path / "store")
    url = view.url if view is not None else os.path.join(store, "g")

    def manifests() -> dict[str, dict[str, Any]]:
        return view.manifests() if view is not None else local_manifests(store, "g")

    def shared() -> set[str]:
        return set(view.shared()) if view is not None else set(local_shared(store, "g"))

    d = make_daemon(store=store)
    model, opt = peft(0)
    with Checkpointer("g", socket=d.socket) as ckpt:
        for step in (1, 2, 3, 4):
            train(model, opt, 1, seed=step)
            if step == 3:
                with torch.no_grad():
                    model.base[1].bias.add_(1.0)
            ckpt.save(step, model=model, optimizer=opt).wait("uploaded", 60)
    expect = state_of(model, opt)
    ms = manifests()
    a, b = ms[tag(2)]["files"][FROZEN]["blob"], ms[tag(4)]["files"][FROZEN]["blob"]
    assert a != b and shared() == {f"{a}.safetensors", f"{b}.safetensors"}

    before = shared()
    assert cli_quiet(["gc", url, "--keep-last", "1", "--blob-grace", "0", "--dry-run"]) == 0
    assert sorted(manifests()) == [tag(s) for s in (1, 2, 3, 4)] and shared() == before
    capsys.readouterr()

    # The default grace keeps a blob no manifest lists while it is young (another writer's
    # save may be about to list it); with no grace it goes.
    assert cli_quiet(["gc", url, "--keep-last", "1"]) == 0
    out = capsys.readouterr().out
    assert f"deleted g@{tag(1)}" in out and f"deleted g@{tag(3)}" in out
    assert sorted(manifests()) == [tag(4)] and shared() == before
    assert cli_quiet(["gc", url, "--keep-last", "1", "--blob-grace", "0"]) == 0
    assert f"deleted g/shared/{a}.safetensors" in capsys.readouterr().out
    assert shared() == {f"{b}.safetensors"}  # A: no manifest lists it any more; B: step 4 does
    assert cli_quiet(["verify", f"{url}@{tag(4)}"]) == 0
    state = ckptd.load(url)
    assert bitwise_equal(state["model"], expect["model"])
    assert bitwise_equal(state["optimizer"], expect["optimizer"])
    # The daemon's root is not the store: its copies and blobs are untouched by this gc.
    until(
        lambda: sorted(local_manifests(d.root, "g")) == [tag(s) for s in (2, 3, 4)],
        30,
        "keep-local",
    )
    assert f"{b}.safetensors" in local_shared(d.root, "g")
    # A second pass changes nothing.
    assert cli_quiet(["gc", url, "--keep-last", "1", "--blob-grace", "0"]) == 0
    assert sorted(manifests()) == [tag(4)] and shared() == {f"{b}.safetensors"}


def test_gc_racing_a_save_that_lists_an_unlisted_blob_again_never_loses_it(
    s3_bucket: str, s3_server: str, make_daemon: Any, monkeypatch: Any
) -> None:
    """Step 3 lists blob A again, which no manifest in the store lists while step 3's
    manifest is on its way: an operator's ``ckptd gc`` (no grace) deletes A in exactly that
    window. The save must not end with a manifest that lists a missing blob."""
    view = S3View(s3_server, s3_bucket, "race", "rr")
    with hold_proxy(s3_server, monkeypatch) as proxy:
        d = make_daemon(store=f"s3://{s3_bucket}/race", args=["--keep-local", "all"])
        with Checkpointer("rr", socket=d.socket) as ckpt:
            a, h, expect = back_to_a_base(view, proxy, d, ckpt, "rr")
            with monkeypatch.context() as m:  # the operator's gc talks to the server directly
                m.setenv("AWS_ENDPOINT_URL", s3_server)
                assert cli_quiet(["gc", view.url, "--keep-last", "1", "--blob-grace", "0"]) == 0
            assert f"{a}.safetensors" not in view.shared()  # the race happened
            proxy.release()
            h.wait("uploaded", 60)
            drain(ckpt)
    ms = view.manifests()
    assert sorted(ms) == [tag(2), tag(3)]
    assert ms[tag(3)]["files"][FROZEN]["blob"] == a
    assert not view.dangling()
    assert cli_quiet(["verify", f"{view.url}@{tag(3)}"]) == 0
    state = ckptd.load(view.url, tag=tag(3))
    assert bitwise_equal(state["model"], expect["model"])


def test_gc_dry_run_names_the_blobs_its_deletions_would_free(
    make_daemon: Any, tmp_path: Any, capsys: Any
) -> None:
    """``--dry-run`` says what the real pass would delete: the checkpoints, and the blobs that
    no manifest would list once they are gone."""
    store = str(tmp_path / "store")
    d = make_daemon(store=store)
    model, opt = peft(0)
    with Checkpointer("dry", socket=d.socket) as ckpt:
        ckpt.save(1, model=model, optimizer=opt).wait("uploaded", 60)
        with torch.no_grad():
            model.base[1].bias.add_(1.0)
        ckpt.save(2, model=model, optimizer=opt).wait("uploaded", 60)
    a = local_manifests(store, "dry")[tag(1)]["files"][FROZEN]["blob"]
    url = os.path.join(store, "dry")
    capsys.readouterr()
    assert cli_quiet(["gc", url, "--keep-last", "1", "--blob-grace", "0", "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert cli_quiet(["gc", url, "--keep-last", "1", "--blob-grace", "0"]) == 0
    real = capsys.readouterr().out
    assert f"deleted dry/shared/{a}.safetensors" in real  # what the real pass did
    assert f"would delete dry/shared/{a}.safetensors" in dry, dry  # ...the dry run must say


def test_dropping_optimizer_state_keeps_a_blob_a_newer_checkpoint_lists(
    make_daemon: Any, tmp_path: Any
) -> None:
    """Saves with no training between them (skip_unchanged: the client tracks what did not
    change): the optimizer file is unchanged, so it becomes a blob that several checkpoints list. keep-optim-last 1 slims the older ones; the blob the
    newest lists stays, the ones no manifest lists any more go."""
    store = str(tmp_path / "store")
    d = make_daemon(store=store, args=["--keep-optim-last", "1", "--blob-grace", "0"])
    model, opt = peft(0)
    optim = "model.optim.safetensors"
    with Checkpointer("slim", socket=d.socket, skip_unchanged=True) as ckpt:
        train(model, opt, 1, seed=1)
        for step in (1, 2, 3):  # 2 and 3: nothing changed since 1
            ckpt.save(step, model=model, optimizer=opt).wait("uploaded", 60)
        drain(ckpt)
    expect = state_of(model, opt)

    def settled() -> bool:
        ms = local_manifests(store, "slim")
        return all(optim not in ms[tag(s)]["files"] for s in (1, 2)) and set(
            local_shared(store, "slim")
        ) == blobs_of(ms)

    until(settled, 30, "keep-optim-last to slim steps 1 and 2")
    ms = local_manifests(store, "slim")
    assert ms[tag(3)]["files"][optim].get("blob"), ms[tag(3)]["files"][optim]
    assert ms[tag(1)]["optimizer_dropped"] == [optim]
    for step in (1, 2, 3):
        assert cli_quiet(["verify", f"{os.path.join(store, 'slim')}@{tag(step)}"]) == 0
    state = ckptd.load(os.path.join(store, "slim"))
    assert bitwise_equal(state["optimizer"], expect["optimizer"])
    assert bitwise_equal(state["model"], expect["model"])
