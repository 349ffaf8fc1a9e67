"""The on-disk format: safetensors files whose data sections are laid out in the arena.

A save is planned once on the client: every tensor gets a place in the shared-memory arena that is
exactly its place in the data section of its safetensors file, so the daemon writes header + arena
bytes with large sequential writes and never re-packs. Tensors are ordered by element size
(largest first) so every tensor is naturally aligned within the 8-byte aligned data section, and
packed without holes as the safetensors format requires.

Files of one checkpoint (``<model>`` is ``model`` by default):
  ``<model>.weights.safetensors``  state_dict tensors under their own keys; tied tensors stored once,
                                   the other names in ``__metadata__["ckptd.aliases"]``.
  ``<model>.frozen.safetensors``   with dedup on (the default), a module's frozen parameters
                                   (``requires_grad=False``): stored apart, so that the daemon
                                   keeps one copy for every checkpoint of the run.
  ``<model>.optim.safetensors``    optimizer tensors under their state_dict paths (``state.0.exp_avg``);
                                   the rest of the optimizer state as JSON in ``ckptd.optimizer``.
  ``extra.msgpack``                user extras as plain data; tensors and arrays go to
  ``extra.safetensors``            and are referenced from the msgpack by name.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import attrgetter, itemgetter
from typing import Any

import msgpack
import torch

from .errors import SerializationError
from .header import FORMAT, decode_header, encode_header_json
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
    dtype: str
    shape: list[int]
    begin: int
    end: int
    arena_offset: int


@dataclass(slots=True, eq=False)
class FilePlan:
    """A file of the checkpoint: header bytes + a data section that lives in the arena.

    Reused across saves of the same tensors (see ``PlanCache``): only ``header`` (the metadata
    changes, e.g. the learning rate) and ``srcs`` are refreshed.
    """

    name: str
    header: bytes
    arena_offset: int
    data_size: int
    tensors: list[TensorSlot] = field(default_factory=list)
    srcs: list[torch.Tensor] = field(default_factory=list)  # the live tensor of each slot
    sig: tuple[Any, ...] = ()
    entries_json: str = ""
    order: list[int] = field(default_factory=list)  # tensors[j] is the order[j]-th input
    dedup: bool = False  # the daemon should look for these bytes among the run's blobs
    reuse: str | None = None  # not staged: the daemon's blob (a digest) holds these bytes


class PlanCache:
    """What does not change between saves of the same objects, kept by one Checkpointer.

    With ~10,000 small tensors, laying out headers and building arena views costs far more than
    the copy itself; a save of unchanged shapes reuses them and pays only for the copy.
    """

    def __init__(self) -> None:
        self.files: dict[str, FilePlan] = {}
        self.modules: dict[int, tuple[int, set[str], dict[str, Any]]] = {}
        self.state_json: dict[str, tuple[Any, str]] = {}  # escaped, see _optim_meta
        self.optim_layout: dict[str, tuple[Any, Any, list[str]]] = {}
        self.aliases: dict[str, tuple[int, dict[str, str], bool]] = {}
        self.optim_ids: dict[int, tuple[Any, dict[int, int], list[list[int]]]] = {}


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

    def add_file(self, name: str, tensors: dict[str, torch.Tensor], meta_json: str) -> None:
        """Place a file's tensors; ``meta_json`` is its ``__metadata__`` object as JSON."""
        values = list(tensors.values())
        sig = _signature(tensors, values) if self.cache is not None else ()
        cached = self.cache.files.get(name) if self.cache is not None else None
        if cached is not None and cached.sig == sig and cached.arena_offset == self.cursor:
            cached.srcs = pick_in_order(values, cached.order)
            cached.header = encode_header_json(meta_json, cached.entries_json)
            self.files.append(cached)
            self.cursor = cached.arena_offset + _round_up(cached.data_size, ALIGN)
            return
        entries = []
        for tname, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise SerializationError(f"{name}: {tname} is not a tensor")
            check_tensor(f"{name}: {tname}", t)
            entries.append((tname, t))
        position = {k: i for i, k in enumerate(tensors)}
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
                    tname, DTYPES[t.dtype], list(t.shape), offset, offset + nbytes, base + offset
                )
            )
            offset += nbytes
        entries_json = json.dumps(header, separators=(",", ":"))[1:-1]
        plan = FilePlan(
            name,
            encode_header_json(meta_json, entries_json),
            base,
            offset,
            slots,
            [t for _, t in entries],
            sig,
            entries_json,
        )
        plan.order = [position[k] for k, _ in entries]
        if self.cache is not None:
            self.cache.files[name] = plan
        self.files.append(plan)
        self.cursor = base + _round_up(offset, ALIGN)


_DTYPE = attrgetter("dtype")
_SHAPE = attrgetter("shape")


def _signature(tensors: dict[str, Any], values: list[Any]) -> tuple[Any, ...]:
    """Names, dtypes and shapes: what a cached layout depends on.

    Built with ``map`` (no Python frame per tensor): with 10,000 tensors a per-tensor tuple
    cost more than the copy it guards.
    """
    try:
        return (list(tensors), list(map(_DTYPE, values)), list(map(_SHAPE, values)))
    except AttributeError:  # not a tensor: the full path names it
        return ()


def pick_in_order(values: list[Any], order: list[int]) -> list[Any]:
    """``[values[i] for i in order]`` without a Python frame per item."""
    if len(order) > 1:
        return list(itemgetter(*order)(values))
    return [values[i] for i in order]


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
        sd = _plain_state(obj)
        if sd is None:
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


_Module = torch.nn.Module
_PLAIN_CLASSES: set[type] = set()  # module classes that do not customise state_dict


def _plain_class(cls: type) -> bool:
    if cls in _PLAIN_CLASSES:
        return True
    plain = (
        getattr(cls, "state_dict", None) is _Module.state_dict
        and getattr(cls, "_save_to_state_dict", None) is _Module._save_to_state_dict
        and getattr(cls, "get_extra_state", None) is _Module.get_extra_state
    )
    if plain:
        _PLAIN_CLASSES.add(cls)
    return plain


def _plain_state(module: torch.nn.Module) -> dict[str, Any] | None:
    """``state_dict(keep_vars=True)`` of a module tree that customises none of it, or None.

    ``Module.state_dict`` costs ~10 us per submodule in hook and prefix handling; a tree with no
    state_dict hooks, overrides or extra state holds exactly its parameters and persistent
    buffers, in the same order, which this walk collects at a third of the cost.
    """
    out: dict[str, Any] = {}

    def walk(m: torch.nn.Module, prefix: str) -> bool:
        if m._state_dict_hooks or m._state_dict_pre_hooks or not _plain_class(type(m)):
            return False
        for n, p in m._parameters.items():
            if p is not None:
                out[prefix + n] = p
        if m._buffers:
            skip = m._non_persistent_buffers_set
            for n, b in m._buffers.items():
                if b is not None and n not in skip:
                    out[prefix + n] = b
        for n, c in m._modules.items():
            if c is not None and not walk(c, f"{prefix}{n}."):
                return False
        return True

    try:
        return out if walk(module, "") else None
    except AttributeError:  # e.g. a module unpickled from an older torch: let state_dict cope
        return None


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
                map(isinstance, tensors.values(), repeat(torch.Tensor))
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
    per_param = list(state.values())
    if not all(map(isinstance, per_param, repeat(dict))):
        return flatten(osd, "", json_safe=True)
    # map/chain rather than a loop: one Python frame per parameter is most of the cost here
    values = list(chain.from_iterable(map(dict.values, per_param)))
    if not all(map(isinstance, values, repeat(torch.Tensor))):
        return flatten(osd, "", json_safe=True)
    sig = (list(state), list(map(tuple, per_param)))
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
        if isinstance(ids, list) and set(map(type, ids)) <= {int}:
            skel = (
                {**skel, "params": ids}
                if isinstance(skel, dict) and "__ckptd__" not in skel
                else skel
            )
            out.append(skel)
        else:
            return flatten(groups, "param_groups", json_safe=True)
    return out, tensors


def _meta_json(metadata: dict[str, str]) -> str:
    return json.dumps(metadata, separators=(",", ":"))


def _escaped(text: str) -> str:
    """``text`` as the inside of a JSON string. Escaping is per character, so the escapes of
    two pieces, joined, are the escape of the pieces joined."""
    return json.dumps(text)[1:-1]


def _optim_meta(name: str, skel: Any, cache: PlanCache | None) -> str:
    """The optimizer file's ``__metadata__`` as JSON: the skeleton in ``ckptd.optimizer``.

    The per-parameter part of the skeleton is most of the header (~200 bytes a parameter);
    it is encoded and escaped once while unchanged, and only ``param_groups`` (the learning rate
    moves every step) is encoded per save.
    """
    if cache is None or not isinstance(skel, dict) or set(skel) != {"state", "param_groups"}:
        return _meta_json({"format": "pt", "ckptd.optimizer": json.dumps(skel)})
    known = cache.state_json.get(name)
    if known is not None and (known[0] is skel["state"] or known[0] == skel["state"]):
        head = known[1]
    else:
        head = _escaped(f'{{"state":{json.dumps(skel["state"])},"param_groups":')
        cache.state_json[name] = (skel["state"], head)
    groups = _escaped(json.dumps(skel["param_groups"]) + "}")
    return f'{{"format":"pt","ckptd.optimizer":"{head}{groups}"}}'


_Optimizer = torch.optim.Optimizer


def _optim_state(obj: Any, what: str, cache: PlanCache | None = None) -> dict[str, Any]:
    if isinstance(obj, torch.optim.Optimizer):
        fast = _plain_optim_state(obj, cache) if cache is not None else None
        return fast if fast is not None else obj.state_dict()
    if isinstance(obj, dict):
        return obj
    raise SerializationError(
        f"{what} must be an Optimizer or its state dict, not {type(obj).__name__}"
    )


def _plain_optim_state(opt: torch.optim.Optimizer, cache: PlanCache) -> dict[str, Any] | None:
    """``opt.state_dict()`` of an optimizer that does not customise it, or None.

    ``Optimizer.state_dict`` numbers every parameter on each call; the numbering depends only on
    which parameters are in which group, so it is kept while that is unchanged. The result is
    what ``state_dict`` returns: per-parameter state dicts by number, then the groups with
    ``params`` as numbers (last key).
    """
    if (
        type(opt).state_dict is not _Optimizer.state_dict
        or getattr(opt, "_optimizer_state_dict_pre_hooks", None)
        or getattr(opt, "_optimizer_state_dict_post_hooks", None)
    ):
        return None
    groups = opt.param_groups
    ids = [list(map(id, g["params"])) for g in groups]
    known = cache.optim_ids.get(id(opt))
    if known is None or known[0] != ids:
        mapping: dict[int, int] = {}
        packed: list[list[int]] = []
        for g_ids in ids:
            start = sum(map(len, packed))
            mapping.update({pid: n for n, pid in enumerate(g_ids, start) if pid not in mapping})
            packed.append([mapping[pid] for pid in g_ids])
        known = (ids, mapping, packed)
        if len(cache.optim_ids) > 16:  # optimizers re-created over a run: keep no old numberings
            cache.optim_ids.clear()
        cache.optim_ids[id(opt)] = known
    mapping, packed = known[1], known[2]
    state = {
        (mapping[id(k)] if isinstance(k, torch.Tensor) else k): v for k, v in opt.state.items()
    }
    param_groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": list(p)}
        for g, p in zip(groups, packed, strict=True)
    ]
    return {"state": state, "param_groups": param_groups}


_REQUIRES_GRAD = attrgetter("requires_grad")


def split_frozen(
    tensors: dict[str, torch.Tensor], buffers: set[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(trainable parameters and buffers, frozen parameters) of a module's tensors."""
    flags = list(map(_REQUIRES_GRAD, tensors.values()))
    if all(flags) or not any(isinstance(t, torch.nn.Parameter) for t in tensors.values()):
        return tensors, {}
    frozen = {
        k: t
        for (k, t), grad in zip(tensors.items(), flags, strict=True)
        if not grad and k not in buffers and isinstance(t, torch.nn.Parameter)
    }
    if not frozen:
        return tensors, {}
    return {k: t for k, t in tensors.items() if k not in frozen}, frozen


def plan_save(
    models: dict[str, Any],
    optimizers: dict[str, Any],
    extra: Any = None,
    cache: PlanCache | None = None,
    *,
    dedup: bool = False,
    stable: dict[str, set[str]] | None = None,
) -> SavePlan:
    """Lay out a checkpoint. Raises ``SerializationError`` before anything is copied.

    ``dedup``: a module's frozen parameters go to ``<model>.frozen.safetensors``, marked for
    the daemon to store once (``FilePlan.dedup``); for a model given as a plain state dict,
    which says nothing of ``requires_grad``, the keys in ``stable[name]`` (tensors that did not
    change since the last save: ``unchanged.StableKeys``) go there instead."""
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
        frozen: dict[str, torch.Tensor] = {}
        if dedup and isinstance(obj, torch.nn.Module):
            tensors, frozen = split_frozen(tensors, buffers)
        elif dedup and stable and stable.get(name):
            keys = stable[name]
            frozen = {k: t for k, t in tensors.items() if k in keys}
            tensors = {k: t for k, t in tensors.items() if k not in keys}
        fname = f"{name}.weights.safetensors"
        b.add_file(fname, tensors, _meta_json(meta))
        sync.update(f"{fname}/{k}" for k in buffers if k in tensors)
        if frozen:
            b.add_file(f"{name}.frozen.safetensors", frozen, _meta_json({"format": "pt"}))
            b.files[-1].dedup = True
    for name, obj in optimizers.items():
        osd = _optim_state(obj, f"optimizer {name!r}", cache)
        skel, tensors = _flatten_optim(name, osd, cache)
        b.add_file(
            f"{name}.optim.safetensors",
            tensors,
            _optim_meta(name, skel, cache),
        )
    if extra is not None:
        skel, tensors = flatten(extra, "extra")
        inline["extra.msgpack"] = msgpack.packb(skel, use_bin_type=True)
        if tensors:
            b.add_file("extra.safetensors", tensors, _meta_json({"format": "pt"}))
            # extras (RNG states, small arrays) are copied in program order, never raced.
            sync.update(f"extra.safetensors/{k}" for k in tensors)
    return SavePlan(b.files, inline, b.cursor, configs, sync)
