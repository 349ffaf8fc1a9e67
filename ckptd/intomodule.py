"""Reading a weights file straight into a module's own parameters (``Checkpointer.restore``).

A restore that loads the file into a buffer and then ``load_state_dict``-copies it holds the
weights twice, and copies them once more than it must. When the checkpoint is local (the
daemon's root, a directory), every tensor of the file whose key, dtype and shape match a
contiguous CPU tensor of the module's ``state_dict`` is read by ``preadv`` into that tensor's
memory; the rest (the header, padding, tensors the module lays out differently) goes into small
buffers of its own. The pieces are read in file order's CRC32C, combined, and checked against
the manifest before the caller applies the state. The state handed back maps the matched keys
to the module's own parameters, so ``load_state_dict`` copies nothing for them (``copy_`` of a
tensor onto itself returns at once) and still applies its own rules (strict keys, hooks).

The price: a file that fails its CRC32C has already been written into the module. The caller
then falls back to an older checkpoint, which overwrites it again; only when none verifies is the
module left partly overwritten, and that restore raises.
"""

from __future__ import annotations

import asyncio
from typing import Any

import crc32c
import torch

from .errors import IntegrityError
from .fmt import TORCH_DTYPES, decode_header
from .header import MAX_HEADER
from .readinto import Source, check_crc, read_listed
from .storage import ProgressFn
from .storage.base import combine_crcs

__all__ = ["read_into_module"]

_AT_ONCE = 4


def _dest(t: Any, dtype: torch.dtype, shape: list[int]) -> torch.Tensor | None:
    """``t`` when the stored tensor can be read straight into its memory, else None."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return None
    if t.device.type != "cpu" or t.layout != torch.strided or t.dtype != dtype:
        return None
    if list(t.shape) != list(shape) or not t.is_contiguous() or t.numel() == 0:
        return None
    return t


async def _header(src: Source, name: str, rec: dict[str, Any]) -> tuple[bytearray, dict, int]:
    size = int(rec["size"])
    if size < 8:
        raise IntegrityError(f"{name}: too short for a safetensors file")
    head = bytearray(8)
    await read_listed(src, name, rec, memoryview(head))
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER or 8 + n > size:
        raise IntegrityError(f"{name}: header of {n} bytes runs past the end of the file")
    raw = bytearray(8 + n)
    await read_listed(src, name, rec, memoryview(raw))
    try:
        header, start = decode_header(bytes(raw), size)
    except IntegrityError as e:
        raise IntegrityError(f"{name}: {e}") from e
    return raw, header, start


async def _read(
    src: Source,
    name: str,
    rec: dict[str, Any],
    module: torch.nn.Module,
    progress: ProgressFn | None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    size = int(rec["size"])
    raw, header, start = await _header(src, name, rec)
    meta = header.pop("__metadata__", None) or {}
    own = module.state_dict(keep_vars=True)
    used: list[tuple[int, int]] = []  # byte ranges of module memory already a destination
    pieces: list[tuple[int, memoryview]] = []  # (file offset, destination), covering the file
    out: dict[str, torch.Tensor] = {}
    cursor = len(raw)  # the header's bytes, already read: only their CRC32C is needed
    for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        b, e = (start + info["data_offsets"][0], start + info["data_offsets"][1])
        dtype = TORCH_DTYPES[info["dtype"]]
        if b < cursor:
            raise IntegrityError(f"{name}: tensor {key} overlaps another")
        if b > cursor:
            pieces.append((cursor, memoryview(bytearray(b - cursor))))
        t = _dest(own.get(key), dtype, info["shape"])
        if t is not None:
            lo = t.data_ptr()
            hi = lo + t.numel() * t.element_size()
            if hi - lo != e - b or any(lo < u_hi and u_lo < hi for u_lo, u_hi in used):
                t = None
            else:
                used.append((lo, hi))
        if t is not None:
            out[key] = t
            view = t.detach().view(-1).view(torch.uint8)
        else:
            view = torch.empty(e - b, dtype=torch.uint8)
            try:
                out[key] = view.view(dtype).reshape(info["shape"])
            except RuntimeError as exc:
                raise IntegrityError(f"{name}: tensor {key} does not fit its shape") from exc
        pieces.append((b, memoryview(view.numpy())))
        cursor = e
    if cursor < size:
        pieces.append((cursor, memoryview(bytearray(size - cursor))))
    if progress is not None:
        progress(len(raw))
    gate = asyncio.Semaphore(_AT_ONCE)

    async def one(offset: int, view: memoryview) -> tuple[int, int]:
        async with gate:
            crc = await read_listed(src, name, rec, view, offset=offset, progress=progress)
        return crc, len(view)

    crcs = await asyncio.gather(*(one(o, v) for o, v in pieces))
    check_crc(name, rec, combine_crcs([(crc32c.crc32c(raw), len(raw)), *crcs]))
    return out, meta


async def read_into_module(
    src: Source,
    name: str,
    rec: dict[str, Any],
    module: torch.nn.Module,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of the weights file ``name`` (like ``reader.file_tensors``),
    the matching ones read into ``module``'s own tensors and returned as those tensors; the file
    is checked against the manifest's size and CRC32C before this returns."""
    return await _read(src, name, rec, module, progress)
