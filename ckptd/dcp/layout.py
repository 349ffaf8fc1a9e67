"""What a sharded checkpoint looks like in the store: shard file names, the keys of DCP's
items inside them, and DCP's ``Metadata`` as JSON (``dcp-metadata.json``, never a pickle)."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from ..errors import ConfigError, IntegrityError, SerializationError
from ..fmt import DTYPES, TORCH_DTYPES
from ..names import check_file_name

log = logging.getLogger("ckptd.dcp")


METADATA = "dcp-metadata.json"
BYTES_KEY = "ckptd.dcp.bytes"
TRAILING_INT = re.compile(r"(\d+)$")


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


@dataclasses.dataclass(frozen=True, slots=True)
class Loc:
    """Where one write item lives: a shard file and the key in it. DCP keeps these per item in
    ``Metadata.storage_data``; ``size``/``crc32c`` describe the whole file, for the commit."""

    file: str
    key: str
    size: int = 0
    crc32c: str = ""
    blob: str | None = None  # the file is the run's shared blob of this digest (``ckptd.blobs``)


def item_key(fqn: str, offsets: Any, sizes: Any, full: Any) -> str:
    if all(o == 0 for o in offsets) and list(sizes) == list(full):
        return fqn
    return f"{fqn}@{','.join(str(int(o)) for o in offsets)}"


# ---- metadata as JSON ------------------------------------------------------------------------


def encode_metadata(md: Metadata) -> dict[str, Any]:
    """DCP's ``Metadata`` as plain JSON: readable anywhere, and nothing to unpickle."""
    sd: dict[str, Any] = {}
    for fqn, m in md.state_dict_metadata.items():
        if isinstance(m, BytesStorageMetadata):
            sd[fqn] = {"type": "bytes"}
            continue
        p = m.properties
        if p.layout != torch.strided:
            raise SerializationError(f"{fqn}: layout {p.layout} is not supported")
        sd[fqn] = {
            "type": "tensor",
            "dtype": DTYPES[p.dtype],
            "requires_grad": bool(p.requires_grad),
            "size": list(m.size),
            "chunks": [[list(c.offsets), list(c.sizes)] for c in m.chunks],
        }
    storage = [
        [idx.fqn, None if idx.offset is None else list(idx.offset), idx.index, loc.file, loc.key]
        for idx, loc in (md.storage_data or {}).items()
    ]
    planner_data = None
    if isinstance(md.planner_data, dict):
        try:
            planner_data = {k: list(v) for k, v in md.planner_data.items()}
            json.dumps(planner_data)
        except (TypeError, ValueError):
            planner_data = None
    return {
        "format": "ckptd-dcp/1",
        "version": md.version,
        "state_dict_metadata": sd,
        "storage_data": storage,
        "planner_data": planner_data,
    }


def decode_metadata(doc: Any) -> Metadata:
    """The JSON form back into DCP's ``Metadata``; anything malformed is an ``IntegrityError``
    (it comes from the store), and every shard file it names must pass the name rule."""
    try:
        sd: dict[str, Any] = {}
        for fqn, m in doc["state_dict_metadata"].items():
            if m["type"] == "bytes":
                sd[fqn] = BytesStorageMetadata()
                continue
            props = TensorProperties(
                dtype=TORCH_DTYPES[m["dtype"]], requires_grad=bool(m["requires_grad"])
            )
            chunks = [ChunkStorageMetadata(size_of(o), size_of(s)) for o, s in m["chunks"]]
            sd[fqn] = TensorStorageMetadata(props, size_of(m["size"]), chunks)
        storage = {}
        for fqn, offset, index, file, key in doc["storage_data"]:
            idx = MetadataIndex(fqn, None if offset is None else size_of(offset), index)
            storage[idx] = Loc(check_file_name(file, "shard file"), key)
        planner_data = doc.get("planner_data")
        if isinstance(planner_data, dict):
            planner_data = {k: tuple(v) for k, v in planner_data.items()}
        return Metadata(sd, planner_data, storage, version=doc.get("version"))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError,
            OverflowError, RuntimeError, ConfigError) as e:  # fmt: skip
        raise IntegrityError(f"{METADATA} is malformed: {e!r}") from e


def size_of(dims: Any) -> torch.Size:
    """A shape or offset list from the store: non-negative ints only (``torch.Size`` would take
    floats and negatives, and fail later in an allocation)."""
    if not isinstance(dims, list) or not all(type(d) is int and d >= 0 for d in dims):
        raise ValueError(f"{dims!r} is not a list of non-negative integers")
    return torch.Size(dims)
