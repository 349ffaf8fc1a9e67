"""Bitwise comparison of checkpoint states: what "restored exactly" means, in one place.

Comparing tensors by value is not enough: NaN != NaN, -0.0 == 0.0, and a value survives a dtype
change. A restore is exact only if structure, container types, dtypes, shapes and every byte
agree. The demo's self-check, the tests and the benchmark's verification use this one definition.
"""

from __future__ import annotations

from typing import Any

import torch


def bitwise_equal(a: Any, b: Any) -> bool:
    """Same structure, same types, and tensors equal bit for bit (NaNs and -0.0 included)."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.numel() == 0:
            return True
        return bool(torch.equal(_bytes(a), _bytes(b)))
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(bitwise_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, list | tuple):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(bitwise_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    return bool(a == b)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


__all__ = ["bitwise_equal"]
