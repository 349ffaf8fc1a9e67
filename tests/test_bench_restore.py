"""The restore section of ``python -m bench`` runs end to end on a tiny state, so it cannot rot.

Real parts only: a ckptd daemon, moto_server and fake-gcs-server on loopback, the restore
children. The figures of so small a state mean nothing; what is checked is that every row and
goal is produced, every restore is bitwise equal, and nothing is left running or on disk.
"""

from __future__ import annotations

import os

import pytest

from bench import restore as BR
from bench.__main__ import parse_args
from bench.infra import Infra
from bench.report import Results
from bench.restore_peers import PLANS
from bench.states import free, small_state

pytestmark = pytest.mark.slow  # ~30 s: two servers, a daemon and six child interpreters


def test_restore_section_end_to_end(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for var in ("AWS_ENDPOINT_URL", "STORAGE_EMULATOR_HOST"):
        monkeypatch.delenv(var, raising=False)  # run_restore points them at its own servers
    res = Results()
    state = small_state(200, "cpu")
    try:
        with Infra(str(tmp_path)) as infra:
            case = BR.run_restore(infra, state, repeats=1, res=res)
            work, pids = infra.dir, [infra.moto().pid, infra.fake_gcs().pid]
    finally:
        free(state)
    assert not os.path.exists(work)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    rows = {(r.section, r.contender): r for r in res.rows if r.case == case}
    timed = [
        (BR.LOCAL, BR.TORCH_LOAD), (BR.LOCAL, BR.CK_LOAD), (BR.LOCAL, BR.PEER_RESTORE),
        (BR.LOCAL, BR.CK_RESTORE), (BR.S3, BR.CK_LOAD), (BR.S3, BR.BOTO3), (BR.GCS, BR.CK_LOAD),
        (BR.GCS, BR.GCLOUD), (BR.DCP, BR.CK_DCP), (BR.DCP, BR.FS_DCP),
        *[(BR.S3, BR.raw_s3(p)) for p in PLANS], *[(BR.GCS, BR.raw_gcs(p)) for p in PLANS],
    ]  # fmt: skip
    for key in timed:
        assert key in rows, key
        assert len(rows[key].values) == 1 and rows[key].values[0] > 0, key
        if not key[1].startswith("limit"):
            assert "restored bitwise equal: True" in rows[key].note, (key, rows[key].note)
    rss = [r for r in res.rows if r.section == BR.RSS]
    assert len(rss) == 6
    for r in rss:
        # a restore of the state holds at least about the state (small states: allocator slack)
        assert r.values[0] > 0.5, (r.contender, r.values, r.note)
    names = {g.name for g in res.goals}
    assert len(res.goals) == 11, names
    for g in res.goals:
        assert g.value is not None and g.value > 0, g
    assert "cache" in res.meta["restore"][case]
    assert "## goals" in res.to_text() and case in res.to_text()


def test_restore_flags() -> None:
    quick = parse_args(["--restore", "--quick"])
    assert quick.restore_list == [0.05] and quick.size_list == [] and quick.small_list == []
    full = parse_args([])
    assert full.restore_list == [0.5, 1.5] and full.size_list == [0.1, 0.5, 1.5]
    assert parse_args(["--no-restore"]).restore_list == []
    with pytest.raises(SystemExit):
        parse_args(["--restore", "--no-restore"])
