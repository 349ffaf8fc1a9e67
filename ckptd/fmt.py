"""The on-disk format: safetensors files whose data sections are laid out in the arena.

A save is planned once on the client: every tensor gets a place in the shared-memory arena that is
exactly its place in the data section of its safetensors file, so the daemon writes header + arena
bytes with large sequential writes and never re-packs. Tensors are ordered by element size
(largest first) so every tensor is naturally aligned within the 8-byte aligned data section, and
packed without holes as the safetensors format requires.

Files of one checkpoint (``<model>`` is ``model`` by default):
  ``<model>.weights.safetensors``  state_dict tensors under their own keys; tied tensors stored once,
                                   the other names in ``__metadata__["ckptd.aliases"]``.
  ``<model>.optim.safetensors``    optimizer tensors under their state_dict paths (``state.0.exp_avg``);
                                   the rest of the optimizer state as JSON in ``ckptd.optimizer``.
  ``extra.msgpack``                user extras as plain data; tensors and arrays go to
  ``extra.safetensors``            and are referenced from the msgpack by name.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from .errors import SerializationError
from .header import FORMAT, decode_header, encode_header
from .tree import flatten

ALIGN = 4096  # arena offset alignment of each file's data section (page aligned)

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
}
TORCH_DTYPES: dict[str, torch.dtype] = {v: k for k, v in DTYPES.items()}
__all__ = ["ALIGN", "DTYPES", "FORMAT", "TORCH_DTYPES", "SavePlan", "decode_header", "plan_save"]


@dataclass(slots=True)
class TensorSlot:
    """One tensor's place: ``arena_offset`` in the arena, ``[begin, end)`` in its data section."""

    name: str
    src: torch.Tensor
    dtype: str
    shape: list[int]
    begin: int
    end: int
    arena_offset: int


@dataclass(slots=True)
class FilePlan:
    """A file of the checkpoint: header bytes + a data section that lives in the arena."""

    name: str
    header: bytes
    arena_offset: int
    data_size: int
    tensors: list[TensorSlot] = field(default_factory=list)


@dataclass(slots=True)
class SavePlan:
    files: list[FilePlan]
    inline: dict[str, bytes]  # small files written as they are (extra.msgpack)
    arena_size: int
    model_config: dict[str, Any]
    sync_names: set[str] = field(default_factory=set)  # module buffers: copied in program order


def _key(t: torch.Tensor) -> tuple[Any, ...] | None:
    if t.numel() == 0:
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)


class _Builder:
    def __init__(self) -> None:
        self.files: list[FilePlan] = []
        self.cursor = 0

    def add_file(
        self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
    ) -> None:
        entries = []
        for tname, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise SerializationError(f"{name}: {tname} is not a tensor")
            if t.is_sparse or t.layout != torch.strided:
                raise SerializationError(
                    f"{name}: {tname} has layout {t.layout}; only dense tensors"
                )
            if t.dtype not in DTYPES:
                raise SerializationError(f"{name}: {tname} has unsupported dtype {t.dtype}")
            if t.is_meta:
                raise SerializationError(f"{name}: {tname} is a meta tensor (no data to save)")
            entries.append((tname, t))
        entries.sort(key=lambda e: (-e[1].element_size(), e[0]))
        header: dict[str, Any] = {"__metadata__": metadata}
        base = self.cursor
        offset = 0
        slots = []
        for tname, t in entries:
            nbytes = t.numel() * t.element_size()
            header[tname] = {
                "dtype": DTYPES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + nbytes],
            }
            slots.append(
                TensorSlot(
                    tname, t, DTYPES[t.dtype], list(t.shape), offset, offset + nbytes, base + offset
                )
            )
            offset += nbytes
        self.files.append(FilePlan(name, encode_header(header), base, offset, slots))
        self.cursor = base + _round_up(offset, ALIGN)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _module_state(obj: Any, what: str) -> tuple[dict[str, Any], set[str], dict[str, Any]]:
    """state_dict of a module (or a given dict), its buffer names, and a small config record."""
    if isinstance(obj, torch.nn.Module):
        sd = obj.state_dict()
        params = {n for n, _ in obj.named_parameters(remove_duplicate=False)}
        buffers = {k for k in sd if k not in params}
        config: dict[str, Any] = {
            "class": f"{type(obj).__module__}.{type(obj).__qualname__}",
            "num_parameters": sum(p.numel() for p in obj.parameters()),
        }
        cfg = getattr(obj, "config", None)
        to_dict = getattr(cfg, "to_dict", None)
        if callable(to_dict):
            cfg = to_dict()
        if isinstance(cfg, dict):
            # The JSON round trip turns int keys (HF's id2label) into strings: the socket's
            # msgpack decoder refuses non-string map keys.
            with contextlib.suppress(TypeError, ValueError):
                config["config"] = json.loads(json.dumps(cfg))
        return sd, buffers, config
    if isinstance(obj, dict):
        return obj, set(), {"class": "dict"}
    raise SerializationError(
        f"{what} must be an nn.Module or a state dict, not {type(obj).__name__}"
    )


def _optim_state(obj: Any, what: str) -> dict[str, Any]:
    if isinstance(obj, torch.optim.Optimizer):
        return obj.state_dict()
    if isinstance(obj, dict):
        return obj
    raise SerializationError(
        f"{what} must be an Optimizer or its state dict, not {type(obj).__name__}"
    )


def plan_save(
    models: dict[str, Any],
    optimizers: dict[str, Any],
    extra: Any = None,
) -> SavePlan:
    """Lay out a checkpoint. Raises ``SerializationError`` before anything is copied."""
    b = _Builder()
    inline: dict[str, bytes] = {}
    configs: dict[str, Any] = {}
    sync: set[str] = set()
    for name, obj in models.items():
        sd, buffers, configs[name] = _module_state(obj, f"model {name!r}")
        tensors: dict[str, torch.Tensor] = {}
        aliases: dict[str, str] = {}
        seen: dict[Any, str] = {}
        other: dict[str, Any] = {}
        for k, v in sd.items():
            if isinstance(v, torch.Tensor):
                key = _key(v)
                if key is not None and key in seen:
                    aliases[k] = seen[key]
                    continue
                if key is not None:
                    seen[key] = k
                tensors[k] = v.detach()
            else:
                other[k] = v
        meta = {"format": "pt"}
        if aliases:
            meta["ckptd.aliases"] = json.dumps(aliases, sort_keys=True)
        if other:
            skel, more = flatten(other, "__nontensor__", json_safe=True)
            tensors.update(more)
            meta["ckptd.nontensor"] = json.dumps(skel)
        fname = f"{name}.weights.safetensors"
        b.add_file(fname, tensors, meta)
        sync.update(f"{fname}/{k}" for k in buffers if k in tensors)
    for name, obj in optimizers.items():
        skel, tensors = flatten(_optim_state(obj, f"optimizer {name!r}"), "", json_safe=True)
        b.add_file(
            f"{name}.optim.safetensors",
            {k: v.detach() for k, v in tensors.items()},
            {"format": "pt", "ckptd.optimizer": json.dumps(skel)},
        )
    if extra is not None:
        skel, tensors = flatten(extra, "extra")
        inline["extra.msgpack"] = msgpack.packb(skel, use_bin_type=True)
        if tensors:
            b.add_file("extra.safetensors", tensors, {"format": "pt"})
            # extras (RNG states, small arrays) are copied in program order, never raced.
            sync.update(f"extra.safetensors/{k}" for k in tensors)
    return SavePlan(b.files, inline, b.cursor, configs, sync)
