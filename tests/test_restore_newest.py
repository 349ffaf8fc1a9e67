"""One resume rule over several locations: the newest checkpoint that verifies in the daemon's
root or the store (the root wins a tie), falling back to older ones; a named tag is found
wherever it is. ``restore_into``, ``load_newest``, ``locate_newest`` and the integrations'
``newest`` all follow it.

Checkpoints are written by hand into two local directories standing for the root and the store,
so each case runs in-process in milliseconds.
"""

from __future__ import annotations

import json
import logging
import os

import crc32c
import msgpack
import pytest
import torch
from torch import nn

from ckptd.catalog import locate_newest, newest_first
from ckptd.errors import IntegrityError, NotFoundError
from ckptd.header import encode_header
from ckptd.integrations._common import load_tag, newest
from ckptd.reader import load_newest, restore_into


class One(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, 3))


def weights(value: float) -> bytes:
    raw = torch.full((2, 3), value).view(torch.uint8).numpy().tobytes()
    header = {
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, len(raw)]},
    }
    return encode_header(header) + raw


def write(run: str, tag: str, step: int, pointer: bool = True) -> str:
    """A checkpoint whose weight is ``step`` everywhere; returns its weight file's path."""
    files = {"model.weights.safetensors": weights(float(step)), "extra.msgpack": msgpack.packb({"step": step})}  # fmt: skip
    ck = os.path.join(run, "checkpoints", tag)
    os.makedirs(ck, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(ck, name), "wb") as f:
            f.write(data)
    recs = {n: {"size": len(b), "crc32c": f"{crc32c.crc32c(b):08x}"} for n, b in files.items()}
    manifest = {"tag": tag, "step": step, "files": recs, "created": "2026-12-01T00:00:00Z"}
    with open(os.path.join(ck, "MANIFEST.json"), "w") as f:
        json.dump(manifest, f)
    if pointer:
        with open(os.path.join(run, "latest"), "w") as f:
            f.write(tag)
    return os.path.join(ck, "model.weights.safetensors")


def corrupt(path: str) -> None:
    """Same size, wrong bytes: only the checksum can tell."""
    with open(path, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xde\xad\xbe\xef")


@pytest.fixture
def places(tmp_path) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """(root, store): the run's URL in the daemon's root and in the store."""
    return str(tmp_path / "root" / "run"), str(tmp_path / "store" / "run")


def restore(urls: list[str], tag: str = "latest") -> tuple[dict | None, One]:  # type: ignore[type-arg]
    model = One()
    return restore_into(urls, tag=tag, model=model), model


def test_the_newest_over_both_wins_not_the_first_that_has_one(places) -> None:  # type: ignore[no-untyped-def]
    root, store = places
    write(root, "step-2", 2)
    write(store, "step-4", 4)
    meta, model = restore([root, store])
    assert meta is not None and meta["step"] == 4 and meta["url"] == store
    assert meta["extra"] == {"step": 4}
    assert torch.equal(model.w.detach(), torch.full((2, 3), 4.0))
    # The same rule everywhere.
    assert newest([root, store])["meta"]["step"] == 4  # type: ignore[index]
    assert load_newest([root, store])["meta"]["step"] == 4  # type: ignore[index]
    loc = locate_newest([root, store])
    assert loc is not None and (loc.url, loc.tag) == (store, "step-4")
    assert [(c.url, c.tag) for c in newest_first([root, store])] == [
        (store, "step-4"),
        (root, "step-2"),
    ]


def test_a_newest_that_does_not_verify_falls_back_with_a_warning(places, caplog) -> None:  # type: ignore[no-untyped-def]
    root, store = places
    write(root, "step-2", 2)
    corrupt(write(store, "step-4", 4))
    with caplog.at_level(logging.WARNING, logger="ckptd.catalog"):
        meta, model = restore([root, store])
    assert meta is not None and meta["step"] == 2 and meta["url"] == root
    assert torch.equal(model.w.detach(), torch.full((2, 3), 2.0))
    assert "step-4" in caplog.text and "does not verify" in caplog.text
    loc = locate_newest([root, store])
    assert loc is not None and loc.tag == "step-2"
    assert newest([root, store])["meta"]["step"] == 2  # type: ignore[index]


def test_the_root_wins_a_tie_and_a_bad_root_copy_falls_back_to_the_store(places) -> None:  # type: ignore[no-untyped-def]
    root, store = places
    write(store, "step-4", 4)
    bad = write(root, "step-4", 4)
    meta, _ = restore([root, store])
    assert meta is not None and meta["url"] == root  # local: nothing to download
    corrupt(bad)
    meta, model = restore([root, store])
    assert meta is not None and meta["url"] == store and meta["step"] == 4
    assert torch.equal(model.w.detach(), torch.full((2, 3), 4.0))


def test_a_named_tag_only_in_the_second_location(places) -> None:  # type: ignore[no-untyped-def]
    root, store = places
    write(root, "step-6", 6)
    write(store, "step-4", 4)
    write(store, "step-3", 3, pointer=False)
    meta, model = restore([root, store], tag="step-3")
    assert meta is not None and meta["tag"] == "step-3" and meta["url"] == store
    assert torch.equal(model.w.detach(), torch.full((2, 3), 3.0))
    assert load_tag([root, store], "step-3")["meta"]["step"] == 3
    with pytest.raises(NotFoundError, match=r"step-9.*step-6.*step-9.*step-3, step-4"):
        restore([root, store], tag="step-9")


def test_nothing_anywhere_is_a_fresh_start_but_nothing_verifying_is_an_error(places) -> None:  # type: ignore[no-untyped-def]
    root, store = places
    assert restore([root, store])[0] is None
    assert newest([root, store]) is None and locate_newest([root, store]) is None
    corrupt(write(root, "step-2", 2))
    corrupt(write(store, "step-4", 4))
    with pytest.raises(IntegrityError, match="verifies"):  # a fresh start would lose them
        restore([root, store])
    with pytest.raises(IntegrityError, match="verifies"):
        newest([root, store])


def test_one_location_keeps_load_semantics(places) -> None:  # type: ignore[no-untyped-def]
    """``ckptd.load`` of one run does not fall back: a bad newest is an error naming it."""
    import ckptd

    root, _ = places
    write(root, "step-2", 2)
    corrupt(write(root, "step-4", 4))
    with pytest.raises(IntegrityError, match=r"step-4.*model\.weights\.safetensors"):
        ckptd.load(root)
    meta, _ = restore([root])
    assert meta is not None and meta["step"] == 2
