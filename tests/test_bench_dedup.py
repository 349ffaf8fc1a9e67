"""The incremental-checkpoint section of ``python -m bench`` runs end to end on a tiny state.

Real parts only: ckptd daemons (one with ``--keep-last 3``), moto_server on loopback, real training
steps between saves. The timing figures of so small a state mean nothing; what is checked is that
every row and goal is produced, the byte figures show the dedup (a base uploaded again would be
~30x the changed part), every checkpoint loaded back is bitwise equal, and nothing is left running
or on disk.
"""

from __future__ import annotations

import os

import pytest

from bench import dedup as BD
from bench.__main__ import parse_args
from bench.infra import Infra
from bench.report import Results

pytestmark = pytest.mark.slow  # ~30 s: moto_server, two daemons, ~40 saves


def test_dedup_section_end_to_end(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # run_dedup points it at its server
    res = Results()
    with Infra(str(tmp_path)) as infra:
        cases = BD.run_dedup(infra, 0.05, repeats=1, res=res, full_repeats=2)
        work, moto_pid = infra.dir, infra.moto().pid
    assert not os.path.exists(work)
    with pytest.raises(ProcessLookupError):
        os.kill(moto_pid, 0)

    lora, full, retain = cases
    rows = {(r.case, r.section, r.contender): r for r in res.rows}
    for section in (BD.UP, BD.WRITTEN, BD.IO, BD.E2E, BD.BLOCK, BD.COMMIT):
        for mode in BD.MODES:
            r = rows[(lora, section, mode)]
            assert len(r.values) == 1 and r.values[0] >= 0, (section, mode, r.values)
    for mode in (BD.ON, BD.SKIP):
        assert "bitwise equal: True" in rows[(lora, BD.E2E, mode)].note
    for section in (BD.BLOCK, BD.COMMIT, BD.THROUGHPUT, BD.UP):
        for mode in (BD.OFF, BD.ON):
            assert rows[(full, section, mode)].values[0] > 0, (section, mode)
    assert "bitwise equal: True" in rows[(full, BD.COMMIT, BD.ON)].note
    store = rows[(retain, BD.STORE, "sum of object sizes under the run")]
    assert "bitwise equal: True" in store.note and "3 checkpoints" in store.note, store.note

    # the full save uploads the base every time; dedup only the changed part
    changed = rows[(lora, BD.CHANGED, BD.DENOM)].values[0]
    assert rows[(lora, BD.UP, BD.OFF)].values[0] > 10 * changed

    goals = {g.name: g for g in res.goals}
    assert len(res.goals) == 8, sorted(goals)
    for g in res.goals:
        assert g.value is not None and g.value > 0, g
    for name in (
        "dedup: bytes uploaded per ckpt / changed part",
        "dedup: bytes written per ckpt / changed part",
        "keep-last 3 of 20: store / (3 x changed + base)",
    ):
        assert goals[name].value is not None and goals[name].value < 1.2, goals[name]
    assert res.meta["dedup"]["retention"]["settled"]
    text = res.to_text()
    assert "## goals" in text and lora in text and retain in text


def test_dedup_flags() -> None:
    only = parse_args(["--dedup"])
    assert only.dedup_list == [0.5] and only.size_list == [] and only.small_list == []
    assert only.restore_list == []
    assert parse_args(["--dedup", "--dedup-size", "0.05"]).dedup_list == [0.05]
    assert parse_args(["--quick"]).dedup_list == [0.05]
    assert parse_args(["--no-dedup"]).dedup_list == []
    assert parse_args(["--restore"]).dedup_list == []
    both = parse_args(["--restore", "--dedup"])
    assert both.dedup_list == [0.5] and both.restore_list == [0.5, 1.5]
    with pytest.raises(SystemExit):
        parse_args(["--dedup", "--no-dedup"])
