"""Plain-data trees with tensors taken out, so nothing ever needs pickle.

``flatten`` walks dicts, lists, tuples and scalars and replaces every tensor or numpy array by a
small tag naming where it went; ``unflatten`` reverses it. Anything else is refused up front, so a
lambda in ``extra`` fails before a single byte is staged.

Tags are plain dicts ``{"__ckptd__": kind, ...}`` so that the skeleton stays readable by any msgpack
or JSON reader: ``tuple`` (items), ``dict`` (items as pairs, for non-string keys), ``tensor`` (key),
``ndarray`` (key, dtype) and, in JSON only, ``bytes`` (base64).
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
import torch

from .errors import SerializationError

TAG = "__ckptd__"
_SCALARS = (bool, int, float, str, type(None))
MAX_DEPTH = 64


def flatten(
    obj: Any, prefix: str, *, json_safe: bool = False
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``obj`` into a plain skeleton and ``{name: tensor}``; names are ``prefix.path``."""
    tensors: dict[str, torch.Tensor] = {}

    def sub(path: str, k: object) -> str:
        return f"{path}.{k}" if path else str(k)

    def walk(x: Any, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise SerializationError(f"{path}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(x, torch.Tensor):
            tensors[path] = x
            return {TAG: "tensor", "key": path}
        if isinstance(x, np.ndarray):
            if x.dtype.hasobject:
                raise SerializationError(f"{path}: numpy arrays of Python objects cannot be saved")
            tensors[path] = torch.from_numpy(np.ascontiguousarray(x))
            return {TAG: "ndarray", "key": path, "dtype": x.dtype.str}
        if isinstance(x, np.generic):
            return walk(x.item(), path, depth + 1)
        if isinstance(x, _SCALARS):
            if isinstance(x, int) and not isinstance(x, bool) and not -(2**63) <= x < 2**64:
                return {TAG: "bigint", "value": str(x)}
            if json_safe and isinstance(x, float) and not math.isfinite(x):
                return {TAG: "float", "value": repr(x)}
            return x
        if isinstance(x, bytes | bytearray):
            if json_safe:
                return {TAG: "bytes", "b64": base64.b64encode(bytes(x)).decode()}
            return bytes(x)
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and TAG not in x:
                return {k: walk(v, sub(path, k), depth + 1) for k, v in x.items()}
            items = []
            for k, v in x.items():
                if not isinstance(k, _SCALARS):
                    raise SerializationError(f"{path}: dict key {k!r} is not plain data")
                items.append([k, walk(v, sub(path, k), depth + 1)])
            return {TAG: "dict", "items": items}
        if isinstance(x, list):
            return [walk(v, sub(path, i), depth + 1) for i, v in enumerate(x)]
        if isinstance(x, tuple):
            return {
                TAG: "tuple",
                "items": [walk(v, sub(path, i), depth + 1) for i, v in enumerate(x)],
            }
        raise SerializationError(
            f"{path}: {type(x).__module__}.{type(x).__qualname__} is not plain data "
            "(numbers, strings, bytes, lists, tuples, dicts, tensors, numpy arrays)"
        )

    skeleton = walk(obj, prefix, 0)
    return skeleton, tensors


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Rebuild the object ``flatten`` took apart."""

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            kind = x.get(TAG)
            if kind is None:
                return {k: walk(v) for k, v in x.items()}
            if kind == "tensor":
                return tensors[x["key"]]
            if kind == "ndarray":
                return tensors[x["key"]].numpy().view(np.dtype(x["dtype"])).copy()
            if kind == "tuple":
                return tuple(walk(v) for v in x["items"])
            if kind == "dict":
                return {_key(k): walk(v) for k, v in x["items"]}
            if kind == "bytes":
                return base64.b64decode(x["b64"])
            if kind == "bigint":
                return int(x["value"])
            if kind == "float":
                return float(x["value"])
            raise SerializationError(f"unknown tag {kind!r} in saved state")
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(skeleton)


def _key(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k
