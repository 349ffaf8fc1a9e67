"""``ckptd.dcp.Reader`` reads a plan's files a batch at a time, each batch dropped before the next
is read, so a restore holds about one batch (or one big file) beside the state it fills.
(Bitwise equality of DCP loads, local and from the stores, is in tests/test_dcp.py.)"""

from __future__ import annotations

import pytest
import torch

import ckptd.dcp.reader as dcp_reader
from ckptd.dcp.reader import _batches, _FilesInTurn

MiB = 1 << 20


def test_batches_keep_order_and_budget() -> None:
    sizes = {"a": 60 * MiB, "b": 60 * MiB, "c": 10 * MiB, "d": 300 * MiB, "e": 1}
    assert _batches(list(sizes), sizes, 128 * MiB) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert _batches([], sizes, 128 * MiB) == []


def test_files_are_read_in_turn_and_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dcp_reader, "_BATCH_BYTES", 2 * MiB)
    monkeypatch.setattr(dcp_reader, "file_tensors", lambda buf, name: ({name: buf}, {}))
    sizes = {n: MiB for n in "abcde"}
    reads: list[list[str]] = []
    alive: list[int] = []

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        reads.append(names)
        alive.append(len(files._now))  # what is still held when the next batch is read
        return {n: torch.full((4,), ord(n), dtype=torch.uint8) for n in names}

    files = _FilesInTurn(read, ["a", "a", "b", "c", "c", "d", "e"], sizes)
    for n in "aabccde":
        tensors, _ = files[n]
        assert int(tensors[n][0]) == ord(n)
    assert reads == [["a", "b"], ["c", "d"], ["e"]]  # every file read once, two per batch
    assert alive == [0, 0, 0]
    with pytest.raises(KeyError):
        files["a"]  # asked out of order: never read twice
