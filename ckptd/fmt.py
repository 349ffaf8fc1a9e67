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
from .header import FORMAT, decode_header, encode_header_parts
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
__all__ = [
    "ALIGN",
    "DTYPES",
    "FORMAT",
    "TORCH_DTYPES",
    "PlanCache",
    "SavePlan",
    "decode_header",
    "plan_save",
]


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


@dataclass(slots=True, eq=False)
class FilePlan:
    """A file of the checkpoint: header bytes + a data section that lives in the arena.

    Reused across saves of the same tensors (see ``PlanCache``): only ``header`` (the metadata
    changes, e.g. the learning rate) and each slot's ``src`` are refreshed.
    """

    name: str
    header: bytes
    arena_offset: int
    data_size: int
    tensors: list[TensorSlot] = field(default_factory=list)
    sig: tuple[Any, ...] = ()
    entries_json: str = ""
    order: list[int] = field(default_factory=list)  # tensors[j] is the order[j]-th input


class PlanCache:
    """What does not change between saves of the same objects, kept by one Checkpointer.

    With ~10,000 small tensors, laying out headers and building arena views costs far more than
    the copy itself; a save of unchanged shapes reuses them and pays only for the copy.
    """

    def __init__(self) -> None:
        self.files: dict[str, FilePlan] = {}
        self.modules: dict[int, tuple[int, set[str], dict[str, Any]]] = {}
        self.state_json: dict[str, tuple[Any, str]] = {}
        self.optim_layout: dict[str, tuple[Any, Any, list[str]]] = {}
        self.aliases: dict[str, tuple[int, dict[str, str], bool]] = {}


@dataclass(slots=True)
class SavePlan:
    files: list[FilePlan]
    inline: dict[str, bytes]  # small files written as they are (extra.msgpack)
    arena_size: int
    model_config: dict[str, Any]
    sync_names: set[str] = field(default_factory=set)  # module buffers: copied in program order


def _key(t: torch.Tensor) -> tuple[Any, ...] | None:
    """Tensors with equal keys are the same memory viewed the same way (tied weights)."""
    if t.numel() == 0:
        return None
    try:
        ptr = t.data_ptr()  # includes the storage offset
    except (RuntimeError, NotImplementedError):
        return None
    return (ptr, t.shape, t.stride(), t.dtype, t.get_device())


class _Builder:
    def __init__(self, cache: PlanCache | None = None) -> None:
        self.files: list[FilePlan] = []
        self.cursor = 0
        self.cache = cache

    def add_file(
        self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
    ) -> None:
        items = list(tensors.items())
        sig = tuple([(k, t.dtype, t.shape) for k, t in items]) if self.cache is not None else ()
        cached = self.cache.files.get(name) if self.cache is not None else None
        if cached is not None and cached.sig == sig and cached.arena_offset == self.cursor:
            for ts, i in zip(cached.tensors, cached.order, strict=True):
                ts.src = items[i][1]
            cached.header = encode_header_parts(metadata, cached.entries_json)
            self.files.append(cached)
            self.cursor = cached.arena_offset + _round_up(cached.data_size, ALIGN)
            return
        entries = []
        for tname, t in items:
            if not isinstance(t, torch.Tensor):
                raise SerializationError(f"{name}: {tname} is not a tensor")
            check_tensor(f"{name}: {tname}", t)
            entries.append((tname, t))
        position = {k: i for i, (k, _) in enumerate(items)}
        entries.sort(key=_order)
        header: dict[str, Any] = {}
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
        entries_json = json.dumps(header, separators=(",", ":"))[1:-1]
        plan = FilePlan(
            name,
            encode_header_parts(metadata, entries_json),
            base,
            offset,
            slots,
            sig,
            entries_json,
        )
        plan.order = [position[k] for k, _ in entries]
        if self.cache is not None:
            self.cache.files[name] = plan
        self.files.append(plan)
        self.cursor = base + _round_up(offset, ALIGN)


def check_tensor(what: str, t: torch.Tensor) -> None:
    """What a safetensors data section can hold: dense tensors of a known dtype, with data."""
    if t.is_sparse or t.layout != torch.strided:
        raise SerializationError(f"{what} has layout {t.layout}; only dense tensors")
    if t.dtype not in DTYPES:
        raise SerializationError(f"{what} has unsupported dtype {t.dtype}")
    if t.is_meta:
        raise SerializationError(f"{what} is a meta tensor (no data to save)")


def _order(entry: tuple[str, torch.Tensor]) -> tuple[int, str]:
    """Largest elements first: every tensor is then naturally aligned in the data section."""
    return (-entry[1].element_size(), entry[0])


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _module_state(
    obj: Any, what: str, cache: PlanCache | None = None
) -> tuple[dict[str, Any], set[str], dict[str, Any]]:
    """state_dict of a module (or a given dict), its buffer names, and a small config record."""
    if isinstance(obj, torch.nn.Module):
        # keep_vars: the live tensors themselves (no detach per tensor); copies happen under
        # no_grad, and the same objects save after save let the plan cache recognise them.
        sd = obj.state_dict(keep_vars=True)
        known = cache.modules.get(id(obj)) if cache is not None else None
        if known is not None and known[0] == len(sd):
            return sd, known[1], known[2]
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
        if cache is not None:
            cache.modules[id(obj)] = (len(sd), buffers, config)
        return sd, buffers, config
    if isinstance(obj, dict):
        return obj, set(), {"class": "dict"}
    raise SerializationError(
        f"{what} must be an nn.Module or a state dict, not {type(obj).__name__}"
    )


def _split_state(
    name: str, sd: dict[str, Any], cache: PlanCache | None
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
    """Tensors to store (tied ones once), aliases for the others, and non-tensor entries.

    Finding ties costs a key per tensor; a cached answer is reused while the known ties still
    hold and the names are the same (a new tie would only store a tensor twice, never lose one).
    """
    known = cache.aliases.get(name) if cache is not None else None
    if known is not None and known[0] == len(sd) and not known[2]:
        aliases = known[1]
        if all(_key(sd[a]) == _key(sd[t]) for a, t in aliases.items() if a in sd and t in sd):
            tensors = {k: v for k, v in sd.items() if k not in aliases}
            if len(tensors) + len(aliases) == len(sd) and all(
                isinstance(v, torch.Tensor) for v in tensors.values()
            ):
                return tensors, aliases, {}
    tensors = {}
    aliases = {}
    other: dict[str, Any] = {}
    seen: dict[Any, str] = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            key = _key(v)
            if key is not None and key in seen:
                aliases[k] = seen[key]
                continue
            if key is not None:
                seen[key] = k
            tensors[k] = v
        else:
            other[k] = v
    if cache is not None:
        cache.aliases[name] = (len(sd), aliases, bool(other))
    return tensors, aliases, other


def _flatten_optim(
    name: str, osd: dict[str, Any], cache: PlanCache | None
) -> tuple[Any, dict[str, torch.Tensor]]:
    """``flatten`` for optimizer state, fast when the per-parameter structure is unchanged.

    Common optimizers keep only tensors per parameter (Adam's ``step`` is a tensor), so the
    skeleton and names depend only on which keys each parameter has; they are reused.
    """
    state = osd.get("state")
    if cache is None or not isinstance(state, dict) or set(osd) != {"state", "param_groups"}:
        return flatten(osd, "", json_safe=True)
    keys: list[tuple[Any, ...]] = []
    values: list[Any] = []
    for pid, st in state.items():
        if not isinstance(st, dict):
            return flatten(osd, "", json_safe=True)
        keys.append((pid, *st))
        values.extend(st.values())
    if not all(isinstance(v, torch.Tensor) for v in values):
        return flatten(osd, "", json_safe=True)
    sig = tuple(keys)
    known = cache.optim_layout.get(name)
    if known is None or known[0] != sig:
        skel_state, tensors = flatten(state, "state", json_safe=True)
        known = (sig, skel_state, list(tensors))
        cache.optim_layout[name] = known
    groups, more = _flatten_groups(osd["param_groups"])
    tensors = dict(zip(known[2], values, strict=True))
    tensors.update(more)
    return {"state": known[1], "param_groups": groups}, tensors


def _flatten_groups(groups: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """param_groups, walking everything but the (long, plain) lists of parameter ids."""
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        return flatten(groups, "param_groups", json_safe=True)
    out: list[Any] = []
    tensors: dict[str, torch.Tensor] = {}
    for i, g in enumerate(groups):
        ids = g.get("params")
        rest = {k: v for k, v in g.items() if k != "params"}
        skel, more = flatten(rest, f"param_groups.{i}", json_safe=True)
        tensors.update(more)
        if isinstance(ids, list) and all(type(x) is int for x in ids):
            skel = (
                {**skel, "params": ids}
                if isinstance(skel, dict) and "__ckptd__" not in skel
                else skel
            )
            out.append(skel)
        else:
            return flatten(groups, "param_groups", json_safe=True)
    return out, tensors


def _optim_json(name: str, skel: Any, cache: PlanCache | None) -> str:
    """JSON of an optimizer skeleton; the per-parameter part is reused while it is unchanged."""
    if cache is None or not isinstance(skel, dict) or set(skel) != {"state", "param_groups"}:
        return json.dumps(skel)
    known = cache.state_json.get(name)
    if known is not None and known[0] == skel["state"]:
        state_json = known[1]
    else:
        state_json = json.dumps(skel["state"])
        cache.state_json[name] = (skel["state"], state_json)
    return f'{{"state":{state_json},"param_groups":{json.dumps(skel["param_groups"])}}}'


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
    cache: PlanCache | None = None,
) -> SavePlan:
    """Lay out a checkpoint. Raises ``SerializationError`` before anything is copied."""
    b = _Builder(cache)
    inline: dict[str, bytes] = {}
    configs: dict[str, Any] = {}
    sync: set[str] = set()
    for name, obj in models.items():
        sd, buffers, configs[name] = _module_state(obj, f"model {name!r}", cache)
        tensors, aliases, other = _split_state(name, sd, cache)
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
        skel, tensors = _flatten_optim(name, _optim_state(obj, f"optimizer {name!r}"), cache)
        b.add_file(
            f"{name}.optim.safetensors",
            tensors,
            {"format": "pt", "ckptd.optimizer": _optim_json(name, skel, cache)},
        )
    if extra is not None:
        skel, tensors = flatten(extra, "extra")
        inline["extra.msgpack"] = msgpack.packb(skel, use_bin_type=True)
        if tensors:
            b.add_file("extra.safetensors", tensors, {"format": "pt"})
            # extras (RNG states, small arrays) are copied in program order, never raced.
            sync.update(f"extra.safetensors/{k}" for k in tensors)
    return SavePlan(b.files, inline, b.cursor, configs, sync)
