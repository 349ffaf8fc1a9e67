"""The states under test: GPT-2-like weights plus Adam state, built as tensors (no training).

A state is a real ``nn.Module`` and a real ``torch.optim.Adam`` whose per-parameter state
(``step``, ``exp_avg``, ``exp_avg_sq``) is filled in directly, so every contender sees exactly what
a training loop would hand it: ``model.state_dict()`` and ``optimizer.state_dict()``. The
optimizer is real so that ckptd's step fence (an optimizer step pre-hook) is exercised on CUDA.

Shapes follow GPT-2 (``wte``, ``wpe``, per block ``ln_1``, ``attn.c_attn``, ``attn.c_proj``,
``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``, then ``ln_f`` and a tied ``lm_head``); width and depth are
picked so that weights + Adam state come to the requested size. The 1.5 GB float32 state is GPT-2
small (d=768, 12 blocks, 124 M parameters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

GB = 1e9
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_WIDTHS = (256, 512, 768, 1024, 1280, 1600, 2048)
_MAX_DEPTH = 24
_CTX = 1024


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.ModuleDict({"c_attn": nn.Linear(d, 3 * d), "c_proj": nn.Linear(d, d)})
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(d, 4 * d), "c_proj": nn.Linear(4 * d, d)})


class GPTLike(nn.Module):
    def __init__(self, vocab: int, d: int, depth: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(_CTX, d)
        self.h = nn.ModuleList(Block(d) for _ in range(depth))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)


class ManySmall(nn.Module):
    """``n`` tiny linear layers: 2n parameters, 8n tensors with Adam state (incl. ``step``)."""

    def __init__(self, n: int, d: int = 32) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(n))


@dataclass
class State:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    nbytes: int  # unique tensor bytes in model + optimizer state
    ntensors: int
    params: int
    shape: str
    spec: tuple[Any, ...] = ()  # how to build it again (``build``), e.g. in a child process

    def snapshot(self) -> dict[str, Any]:
        """What a loop hands ``torch.save``/DCP: the two state dicts."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the snapshot once (tied weights once), in a stable order."""
        return unique_tensors(self.snapshot())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def touch(self) -> None:
        """A cheap in-place change, so consecutive saves differ (like an optimizer step)."""
        with torch.no_grad():
            p = next(self.model.parameters())
            p.view(-1)[:1024].add_(1)


def unique_tensors(tree: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    seen: set[tuple[int, int, tuple[int, ...]]] = set()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            key = (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape))
            if key not in seen:
                seen.add(key)
                out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)

    walk(tree)
    return out


def _gpt_params(vocab: int, d: int, depth: int) -> int:
    return (vocab + _CTX) * d + depth * (12 * d * d + 13 * d) + 2 * d


def gpt_shape(target_bytes: float, dtype: str) -> tuple[int, int, int]:
    """(vocab, width, depth) whose weights + Adam moments come closest to ``target_bytes``."""
    per_param = 3 * torch.empty((), dtype=DTYPES[dtype]).element_size()
    want = target_bytes / per_param
    for d in _WIDTHS:
        vocab = 50257 if d >= 512 else 8192
        depth = round((want - _gpt_params(vocab, d, 0)) / (12 * d * d + 13 * d))
        if 1 <= depth <= _MAX_DEPTH:
            return vocab, d, depth
    d = _WIDTHS[-1]
    return 50257, d, max(1, math.ceil((want - _gpt_params(50257, d, 0)) / (12 * d * d)))


def _fill(model: nn.Module, opt: torch.optim.Adam, seed: int) -> None:
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.1, 0.1, generator=gen)
        for p in opt.param_groups[0]["params"]:
            opt.state[p] = {
                "step": torch.tensor(1000.0),  # Adam keeps it on the CPU unless capturable
                "exp_avg": torch.empty_like(p).uniform_(-1e-3, 1e-3, generator=gen),
                "exp_avg_sq": torch.empty_like(p).uniform_(0, 1e-6, generator=gen),
            }


def _finish(name: str, model: nn.Module, shape: str, seed: int) -> State:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    _fill(model, opt, seed)
    st = State(name, model, opt, 0, 0, sum(p.numel() for p in model.parameters()), shape)
    ts = st.tensors()
    st.nbytes = sum(t.numel() * t.element_size() for t in ts)
    st.ntensors = len(ts)
    return st


def gpt_state(size_gb: float, dtype: str, device: str | torch.device, seed: int = 0) -> State:
    vocab, d, depth = gpt_shape(size_gb * GB, dtype)
    with torch.device("meta"):
        model = GPTLike(vocab, d, depth)
    model.to_empty(device=device)
    model.to(DTYPES[dtype])
    model.lm_head.weight = model.wte.weight  # tied, as in GPT-2
    shape = f"GPT-2-like V={vocab} d={d} L={depth}"
    st = _finish(f"gpt-{size_gb:g}GB-{dtype}", model, shape, seed)
    st.spec = ("gpt", size_gb, dtype)
    return st


def small_state(ntensors: int, device: str | torch.device, seed: int = 0) -> State:
    """A model whose weights + Adam state hold about ``ntensors`` small tensors."""
    n = max(1, round(ntensors / 8))
    with torch.device("meta"):
        model = ManySmall(n)
    model.to_empty(device=device)
    st = _finish(f"small-{8 * n}t", model, f"{n} x Linear(32, 32)", seed)
    st.spec = ("small", ntensors)
    return st


def build(spec: tuple[Any, ...] | list[Any], device: str | torch.device, seed: int = 0) -> State:
    """The state ``spec`` names (a ``State.spec``), with the values of ``seed``."""
    if spec[0] == "gpt":
        return gpt_state(float(spec[1]), str(spec[2]), device, seed)
    if spec[0] == "small":
        return small_state(int(spec[1]), device, seed)
    raise ValueError(f"unknown state spec {spec!r}")


def free(state: State) -> None:
    state.optimizer.state.clear()
    for p in state.model.parameters():
        p.data = torch.empty(0, device=p.device, dtype=p.dtype)


__all__ = [
    "GB",
    "State",
    "build",
    "free",
    "gpt_shape",
    "gpt_state",
    "small_state",
    "unique_tensors",
]
