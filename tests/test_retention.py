"""Retention: which checkpoints a policy keeps (``plan``), and what ``apply`` and ``ckptd gc`` then
leave in a store. Keep-best ranks by the metrics a manifest records; the newest checkpoint, the one
a resume needs, survives every policy.

Checkpoints are written by hand (bytes plus a valid manifest), so each case runs in-process in
milliseconds, on the in-memory store and the local one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import crc32c
import pytest

from ckptd.catalog import list_checkpoints, run_sync
from ckptd.cli import build_parser
from ckptd.cli import main as cli
from ckptd.errors import ConfigError
from ckptd.manifest import validate
from ckptd.retention import BestMode, Retention, apply, plan
from ckptd.storage import Store
from ckptd.storage.local import LocalStore
from ckptd.storage.memory import MemoryStore

RUN = "r"
WEIGHTS = "model.weights.safetensors"
OPTIM = "model.optim.safetensors"


def man(step: int, metrics: Any = None, *, files: dict[str, bytes] | None = None) -> dict[str, Any]:
    """A valid manifest for tag ``step-<step>``; ``metrics`` goes in verbatim (even if hostile)."""
    recs = {
        n: {"size": len(b), "crc32c": f"{crc32c.crc32c(b):08x}"} for n, b in (files or {}).items()
    }
    m: dict[str, Any] = {"tag": f"step-{step}", "step": step, "files": recs,
                         "created": f"2026-12-01T00:00:{step % 60:02d}Z"}  # fmt: skip
    if metrics is not None:
        m["metrics"] = metrics
    return validate(m, tag=m["tag"])


def kept(
    manifests: list[dict[str, Any]], policy: Retention, protect: set[str] | None = None
) -> list[int]:
    """Steps ``plan`` keeps, ascending."""
    gone = {m["tag"] for m in plan(manifests, policy, protect).delete}
    return sorted(m["step"] for m in manifests if m["tag"] not in gone)


def losses(*values: float | None) -> list[dict[str, Any]]:
    """Manifests at steps 1..n with these val_loss values (None: no metrics recorded)."""
    return [man(i + 1, None if v is None else {"val_loss": v}) for i, v in enumerate(values)]


# ---- policy validation ---------------------------------------------------------------------------


def test_keep_best_needs_a_metric_and_says_why() -> None:
    with pytest.raises(ConfigError, match="metric"):
        Retention(keep_best=2)
    with pytest.raises(ConfigError, match="metric"):
        Retention(keep_best=2, metric="")
    with pytest.raises(ConfigError, match="keep_best"):
        Retention(metric="val_loss")  # a metric alone would silently do nothing


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_keep_best_must_be_a_positive_integer(bad: Any) -> None:
    with pytest.raises(ConfigError, match="keep_best must be a positive integer"):
        Retention(keep_best=bad, metric="val_loss")


def test_unknown_mode_is_refused_and_known_ones_normalize() -> None:
    with pytest.raises(ConfigError, match="min, max"):
        Retention(keep_best=1, metric="val_loss", mode="median")
    policy = Retention(keep_best=1, metric="acc", mode="max")
    assert policy.mode is BestMode.MAX
    assert Retention(keep_best=1, metric="val_loss").mode is BestMode.MIN


def test_keep_best_alone_is_active() -> None:
    assert Retention(keep_best=1, metric="val_loss").active
    assert not Retention().active
    assert not Retention(keep_every=4).active  # milestones alone keep everything anyway


# ---- plan ----------------------------------------------------------------------------------------


def test_min_keeps_the_lowest_and_the_newest() -> None:
    ms = losses(0.9, 0.3, 0.5, 0.2, 0.8, 0.7)
    assert kept(ms, Retention(keep_best=2, metric="val_loss")) == [2, 4, 6]


def test_max_keeps_the_highest_and_the_newest() -> None:
    ms = [man(i + 1, {"acc": v}) for i, v in enumerate([0.1, 0.9, 0.5, 0.95, 0.2])]
    assert kept(ms, Retention(keep_best=2, metric="acc", mode=BestMode.MAX)) == [2, 4, 5]
    assert kept(ms, Retention(keep_best=2, metric="acc", mode="min")) == [1, 5]  # 1, 5 are lowest


def test_a_tie_goes_to_the_newer_checkpoint() -> None:
    ms = losses(0.5, 0.2, 0.2, 0.2, 0.9)
    assert kept(ms, Retention(keep_best=1, metric="val_loss")) == [4, 5]
    assert kept(ms, Retention(keep_best=2, metric="val_loss")) == [3, 4, 5]


def test_equal_steps_keep_the_later_created_as_newest() -> None:
    a, b = man(5, {"val_loss": 0.9}), man(5, {"val_loss": 0.8})
    b["tag"], b["created"] = "step-5b", "2026-12-02T00:00:00Z"
    older = man(1, {"val_loss": 0.1})
    decided = plan([older, a, b], Retention(keep_best=1, metric="val_loss"))
    assert [m["tag"] for m in decided.delete] == ["step-5"]  # b came last: it is the newest


@pytest.mark.parametrize(
    "hostile",
    [None, {}, {"other": 0.0}, {"val_loss": "0.0"}, {"val_loss": float("nan")},
     {"val_loss": True}, {"val_loss": None}, {"val_loss": [0.0]}, "0.0", {"val_loss": 10**400}],
)  # fmt: skip
def test_a_checkpoint_without_the_metric_never_counts_as_best(hostile: Any) -> None:
    ms = [man(1, hostile), man(2, {"val_loss": 0.5}), man(3, hostile), man(4, {"val_loss": 0.7})]
    # Three best asked, two ranked: the unranked ones go, never filling the quota.
    assert kept(ms, Retention(keep_best=3, metric="val_loss")) == [2, 4]


def test_the_newest_is_kept_even_when_worst_or_unranked() -> None:
    assert kept(losses(0.1, 0.2, 9.0), Retention(keep_best=1, metric="val_loss")) == [1, 3]
    assert kept(losses(0.1, 0.2, None), Retention(keep_best=1, metric="val_loss")) == [1, 3]
    assert kept(losses(None, None, None), Retention(keep_best=2, metric="val_loss")) == [3]
    assert kept(losses(0.4), Retention(keep_best=1, metric="val_loss")) == [1]


def test_keep_best_with_keep_last_and_keep_every_is_a_union() -> None:
    ms = losses(0.1, 0.9, 0.8, 0.7, 0.6, 0.95, 0.99, 0.5)  # steps 1..8
    policy = Retention(keep_last=2, keep_best=1, metric="val_loss")
    assert kept(ms, policy) == [1, 7, 8]
    policy = Retention(keep_last=2, keep_every=4, keep_best=2, metric="val_loss")
    assert kept(ms, policy) == [1, 4, 7, 8]  # best 1 and 8 (0.5), milestone 4, newest 7 and 8


def test_protected_checkpoints_survive_keep_best() -> None:
    ms = losses(0.9, 0.1, 0.8, 0.2, 0.7)
    policy = Retention(keep_best=1, metric="val_loss")
    assert kept(ms, policy, protect={"step-3"}) == [2, 3, 5]


def test_optimizer_state_is_dropped_from_an_old_best_checkpoint() -> None:
    files = {WEIGHTS: b"w", OPTIM: b"o"}
    ms = [man(i + 1, {"val_loss": v}, files=files) for i, v in enumerate([0.1, 0.9, 0.8])]
    decided = plan(ms, Retention(keep_best=1, metric="val_loss", keep_optim_last=1))
    assert [m["tag"] for m in decided.delete] == ["step-2"]
    assert [m["tag"] for m in decided.strip_optim] == ["step-1"]  # newest keeps its optimizer


# ---- apply on a store ----------------------------------------------------------------------------


@pytest.fixture(params=["memory", "local"])
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[Store]:  # type: ignore[no-untyped-def]
    if request.param == "memory":
        name = f"retention-{request.node.name}"
        yield MemoryStore(f"memory://{name}")
        MemoryStore.clear(name)
    else:
        yield LocalStore(str(tmp_path / "store"))


def write(store: Store, step: int, metrics: Any, files: dict[str, bytes]) -> dict[str, Any]:
    """A committed checkpoint: its files, then its manifest (the commit marker)."""
    m = man(step, metrics, files=files)

    async def go() -> None:
        for name, data in files.items():
            await store.put_bytes(f"{RUN}/checkpoints/{m['tag']}/{name}", data)
        await store.put_bytes(f"{RUN}/checkpoints/{m['tag']}/MANIFEST.json", json.dumps(m).encode())

    run_sync(go())
    return m


def keys(store: Store) -> set[str]:
    async def go() -> set[str]:
        return {o.key for o in await store.list(f"{RUN}/")}

    return run_sync(go())


def tags(store: Store) -> set[str]:
    return {k.split("/")[2] for k in keys(store) if k.endswith("/MANIFEST.json")}


def files_of(step: int) -> dict[str, bytes]:
    return {WEIGHTS: f"weights {step}".encode(), OPTIM: f"optim {step}".encode()}


def test_apply_keeps_the_best_and_the_newest_and_deletes_the_rest(store: Store) -> None:
    for step, loss in [(1, 0.9), (2, 0.2), (3, 0.5), (4, 0.8)]:
        write(store, step, {"val_loss": loss}, files_of(step))
    before = keys(store)
    policy = Retention(keep_best=1, metric="val_loss")

    dry = run_sync(apply(store, RUN, policy, dry_run=True))
    assert {m["tag"] for m in dry.delete} == {"step-1", "step-3"}
    assert keys(store) == before  # a dry run deletes nothing

    done = run_sync(apply(store, RUN, policy))
    assert {m["tag"] for m in done.delete} == {"step-1", "step-3"}
    assert tags(store) == {"step-2", "step-4"}
    assert not any("/step-1/" in k or "/step-3/" in k for k in keys(store))  # data gone too
    for step in (2, 4):  # what is kept is byte for byte what was written
        got = run_sync(store.get_bytes(f"{RUN}/checkpoints/step-{step}/{WEIGHTS}"))
        assert got == files_of(step)[WEIGHTS]
    assert run_sync(apply(store, RUN, policy)).delete == []  # a second pass changes nothing


def test_apply_slims_an_old_best_and_the_slim_manifest_still_ranks(store: Store) -> None:
    for step, loss in [(1, 0.1), (2, 0.9), (3, 0.8)]:
        write(store, step, {"val_loss": loss}, files_of(step))
    policy = Retention(keep_best=1, metric="val_loss", keep_optim_last=1)
    done = run_sync(apply(store, RUN, policy))
    assert [m["tag"] for m in done.delete] == ["step-2"]
    assert [m["tag"] for m in done.strip_optim] == ["step-1"]
    raw = run_sync(store.get_bytes(f"{RUN}/checkpoints/step-1/MANIFEST.json"))
    slim = validate(json.loads(raw), tag="step-1")
    assert set(slim["files"]) == {WEIGHTS} and slim["optimizer_dropped"] == [OPTIM]
    assert slim["metrics"] == {"val_loss": 0.1}
    assert f"{RUN}/checkpoints/step-1/{OPTIM}" not in keys(store)
    assert f"{RUN}/checkpoints/step-3/{OPTIM}" in keys(store)  # the newest keeps it
    # The rewritten manifest keeps its metrics, so the next pass still keeps it as best.
    write(store, 4, {"val_loss": 0.7}, files_of(4))
    again = run_sync(apply(store, RUN, policy))
    assert [m["tag"] for m in again.delete] == ["step-3"]
    assert tags(store) == {"step-1", "step-4"}


# ---- ckptd gc --------------------------------------------------------------------------------------


def test_gc_keep_best_on_a_local_store(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    root = str(tmp_path / "store")
    local = LocalStore(root)
    for step, loss in [(1, 0.4), (2, 0.3), (3, 0.6), (4, None)]:
        write(local, step, None if loss is None else {"val_loss": loss}, files_of(step))
    url = os.path.join(root, RUN)
    assert cli(["gc", url, "--keep-best", "1", "--keep-best-metric", "val_loss"]) == 0
    out = capsys.readouterr().out
    assert "deleted r@step-1" in out and "deleted r@step-3" in out and "2 checkpoint(s)" in out
    assert [m["tag"] for m in list_checkpoints(url)] == ["step-2", "step-4"]
    assert not os.path.exists(os.path.join(url, "checkpoints", "step-1", WEIGHTS))


def test_gc_keep_best_max_mode(tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = str(tmp_path / "store")
    local = LocalStore(root)
    for step, acc in [(1, 0.9), (2, 0.3), (3, 0.6)]:
        write(local, step, {"acc": acc}, files_of(step))
    url = os.path.join(root, RUN)
    args = ["gc", url, "--keep-best", "1", "--keep-best-metric", "acc", "--keep-best-mode", "max"]
    assert cli(args) == 0
    assert [m["tag"] for m in list_checkpoints(url)] == ["step-1", "step-3"]


def test_gc_keep_best_without_a_metric_is_bad_usage(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    root = str(tmp_path / "store")
    write(LocalStore(root), 1, {"val_loss": 0.1}, files_of(1))
    assert cli(["gc", os.path.join(root, RUN), "--keep-best", "1"]) == 2
    assert "metric" in capsys.readouterr().err
    assert len(list_checkpoints(os.path.join(root, RUN))) == 1


@pytest.mark.parametrize("verb", ["gc", "serve"])
def test_help_explains_keep_best(verb: str) -> None:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[verb]  # type: ignore[union-attr]
    text = " ".join(sub.format_help().split())
    for flag in ("--keep-best B", "--keep-best-metric NAME", "--keep-best-mode {min,max}"):
        assert flag in text, flag
    assert "newest checkpoint is always kept" in text
    assert "never counts as best" in text
    assert "the one rewrite of a committed checkpoint" in text  # keep-optim-last's exception
