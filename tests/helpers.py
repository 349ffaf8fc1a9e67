"""Small models and comparisons shared by tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ckptd.compare import bitwise_equal

__all__ = ["Net", "bitwise_equal", "train_steps", "until"]


class Net(nn.Module):
    """Covers what a checkpoint must keep: tied weights, buffers, several dtypes, odd shapes."""

    def __init__(self, vocab: int = 64, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.body = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )
        self.bn = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("counter", torch.tensor(7, dtype=torch.int64))  # 0-d int64
        self.register_buffer("empty", torch.zeros(0, 3))  # zero-size
        self.register_buffer("fp16", torch.randn(5, dtype=torch.float16))
        self.register_buffer("bf", torch.randn(3, 4, dtype=torch.bfloat16))
        self.register_buffer("mask", torch.rand(6) > 0.5)
        self.register_buffer("transposed", torch.randn(4, 6).t())  # non-contiguous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).mean(1)
        h = self.bn(h + self.body(h))
        return self.head(h)


def train_steps(
    model: nn.Module, opt: torch.optim.Optimizer, n: int, seed: int, sched: Any = None
) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        x = torch.randint(0, 64, (8, 5), generator=gen)
        y = torch.randint(0, 64, (8,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a condition with a bound: for state with no event to wait on from outside."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
