"""The progress line: drawn only on a TTY and only for work longer than the delay, throttled,
a rate over a short window, a final line; silent otherwise, so logs and pipes never see it. The
clock and the stream are fakes, so nothing here sleeps."""

from __future__ import annotations

import functools
import io
import json
import os
import threading

import crc32c
import pytest

import ckptd
from ckptd import catalog, reader
from ckptd.catalog import run_sync
from ckptd.cli import main as cli
from ckptd.progress import Progress, human_bytes, human_duration
from ckptd.storage.memory import MemoryStore
from tests.test_restore_newest import weights, write

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def frames(text: str) -> list[str]:
    """What was drawn, one entry per ``\\r``, trailing padding dropped."""
    return [f.rstrip(" \n") for f in text.split("\r") if f]


def make(total: int = 100 * MiB, **kw) -> tuple[Progress, FakeTTY, Clock]:  # type: ignore[no-untyped-def]
    stream, clock = FakeTTY(), Clock()
    kw.setdefault("isatty", True)
    p = Progress(total, "verify run@step-4", stream=stream, clock=clock, columns=200, **kw)
    return p, stream, clock


@pytest.fixture(autouse=True)
def _progress_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKPTD_PROGRESS", raising=False)


def test_units() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * MiB, 3 << 30)] == [
        "0 B", "1023 B", "1.5 KiB", "5.0 MiB", "3.0 GiB"
    ]  # fmt: skip
    assert [human_duration(s) for s in (0.4, 42, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]


def test_a_line_after_the_delay_throttled_then_a_final_line() -> None:
    p, out, clock = make()
    clock.now += 0.5
    p(10 * MiB)
    assert out.getvalue() == ""  # short work prints nothing
    clock.now += 0.5
    p(10 * MiB)
    assert frames(out.getvalue()) == [
        "verify run@step-4: 20.0 MiB / 100.0 MiB (20%)  20.0 MiB/s  ETA 4s"
    ]
    clock.now += 0.05
    p(1 * MiB)  # within the redraw interval: counted, not drawn
    assert len(frames(out.getvalue())) == 1
    clock.now += 0.45
    p(9 * MiB)
    assert frames(out.getvalue())[-1].startswith("verify run@step-4: 30.0 MiB / 100.0 MiB (30%)")
    clock.now += 1.5
    p(70 * MiB)
    p.close()
    p.close()  # idempotent
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1  # one line, updated in place
    assert frames(text)[-1] == "verify run@step-4: 100.0 MiB in 3s (33.3 MiB/s)"
    p(5)  # after close: ignored
    assert out.getvalue() == text


def test_the_rate_is_over_a_short_window_and_the_eta_follows_it() -> None:
    p, out, clock = make(total=1000 * MiB, window=3.0)
    clock.now += 1.0
    p(500 * MiB)  # a fast start...
    for _ in range(10):  # ...then 1 MiB/s
        clock.now += 1.0
        p(1 * MiB)
    last = frames(out.getvalue())[-1]
    assert "1.0 MiB/s" in last and "ETA 8m10s" in last, last  # 490 MiB left at 1 MiB/s


def test_short_work_prints_nothing_even_on_a_tty() -> None:
    p, out, clock = make()
    clock.now += 0.9
    p(100 * MiB)
    p.close()
    assert out.getvalue() == ""


def test_a_long_single_step_still_gets_its_final_line() -> None:
    """Downloads count whole files: the first callback may come at the end."""
    p, out, clock = make(total=8 * MiB)
    with p:
        clock.now += 4.0  # one file, downloaded in one go: no callback until it is done
    assert frames(out.getvalue()) == ["verify run@step-4: 0 B in 4s (0.0 MiB/s)"]


def test_silent_when_not_a_tty_or_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    def run(p: Progress, clock: Clock) -> None:
        for _ in range(5):
            clock.now += 1.0
            p(MiB)
        p.close()

    p, out, clock = make(isatty=False)
    run(p, clock)
    assert out.getvalue() == ""
    plain, clock = io.StringIO(), Clock()  # no isatty override: asks the stream
    run(Progress(10 * MiB, "x", stream=plain, clock=clock), clock)
    assert plain.getvalue() == ""
    monkeypatch.setenv("CKPTD_PROGRESS", "0")
    p, out, clock = make()
    run(p, clock)
    assert out.getvalue() == ""


def test_a_failure_ends_the_line_saying_where_it_stopped() -> None:
    p, out, clock = make()
    with pytest.raises(RuntimeError), p:
        clock.now += 2.0
        p(30 * MiB)
        raise RuntimeError("boom")
    assert frames(out.getvalue())[-1] == (
        "verify run@step-4: stopped at 30.0 MiB / 100.0 MiB (30%) after 2s"
    )
    assert out.getvalue().endswith("\n")


def test_long_labels_are_cut_to_the_terminal_and_short_lines_blank_long_ones() -> None:
    stream, clock = FakeTTY(), Clock()
    label = "download s3://bucket/" + "x" * 200 + "/run@step-4"
    p = Progress(100 * MiB, label, stream=stream, isatty=True, clock=clock, columns=80)
    clock.now += 1.0
    p(99 * MiB)
    clock.now += 1.0
    p(1 * MiB)
    p.close()
    parts = [f for f in stream.getvalue().split("\r") if f]
    assert all(len(f.rstrip("\n")) <= 79 for f in parts)
    assert all(f.startswith("…") and "run@step-4: " in f for f in parts)
    assert len(parts[1]) >= len(parts[0])  # padded over what the previous line left


def test_callbacks_from_many_threads_count_every_byte() -> None:
    stream = FakeTTY()
    p = Progress(8 * 2000, "t", stream=stream, isatty=True, delay=0, interval=0)

    def work() -> None:
        for _ in range(2000):
            p(1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    p.close()
    assert p.done == 16000
    drawn = frames(stream.getvalue())
    assert all(f.startswith("t: ") for f in drawn)  # no frame torn by another thread
    assert drawn[-1].startswith("t: 15.6 KiB in")


# ---- wiring: the CLI, load from a remote store --------------------------------------------------


@pytest.fixture
def loud(monkeypatch: pytest.MonkeyPatch) -> FakeTTY:
    """Every Progress of the readers draws at once on one fake TTY."""
    tty = FakeTTY()
    eager = functools.partial(Progress, stream=tty, isatty=True, delay=0, interval=0, columns=200)
    monkeypatch.setattr(catalog, "Progress", eager)
    monkeypatch.setattr(reader, "Progress", eager)
    return tty


def test_verify_output_is_unchanged_when_not_a_tty(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    run = str(tmp_path / "run")
    write(run, "step-4", 4)
    assert cli(["verify", run]) == 0
    out = capsys.readouterr()
    assert out.out == f"ok: {run}@step-4 (step 4), 2 files match the manifest\n"
    assert out.err == ""
    assert cli(["restore", run, str(tmp_path / "dest")]) == 0
    out = capsys.readouterr()
    assert out.out == f"restored {run}@step-4 (step 4) into {tmp_path / 'dest'}\n"
    assert out.err == ""


def test_verify_and_restore_draw_on_a_tty(tmp_path, capsys, loud: FakeTTY) -> None:  # type: ignore[no-untyped-def]
    run = str(tmp_path / "run")
    write(run, "step-4", 4)
    assert cli(["verify", run]) == 0
    assert cli(["restore", run, str(tmp_path / "dest")]) == 0
    assert "ok:" in capsys.readouterr().out  # the result on stdout, progress elsewhere
    ck = os.path.join(run, "checkpoints", "step-4")
    size = sum(os.path.getsize(os.path.join(ck, n)) for n in os.listdir(ck) if n != "MANIFEST.json")
    done = [f.split(" in ")[0] for f in frames(loud.getvalue()) if " in " in f]
    assert done == [f"verify {run}@step-4: {size} B", f"restore {run}@step-4: {size} B"]


def test_load_from_a_remote_store_reports_one_streamed_read(loud: FakeTTY) -> None:
    url = "memory://progress-test/run"
    files = {"model.weights.safetensors": weights(7.0)}
    recs = {n: {"size": len(b), "crc32c": f"{crc32c.crc32c(b):08x}"} for n, b in files.items()}
    manifest = {"tag": "t", "step": 7, "files": recs, "created": "2026-12-01T00:00:00Z"}

    async def put() -> None:
        store = MemoryStore(url)
        for name, data in files.items():
            await store.put_bytes(f"checkpoints/t/{name}", data)
        await store.put_bytes("checkpoints/t/MANIFEST.json", json.dumps(manifest).encode())

    run_sync(put())
    try:
        state = ckptd.load(url)
    finally:
        MemoryStore.clear("progress-test")
    assert state["meta"]["step"] == 7
    size = len(files["model.weights.safetensors"])
    done = [f.split(" in ")[0] for f in frames(loud.getvalue()) if " in " in f]
    # One pass: the download is the check (ranged reads into memory, CRC32C as they land).
    assert done == [f"load {url}@t: {size} B"]
