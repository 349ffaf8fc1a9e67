"""``ckptd demo``: the README's main job, end to end on a local store.

Starts a daemon, trains a small tied-embedding language model on synthetic data with one
``ckpt.save`` line in the loop, drains, restores the newest checkpoint into fresh objects, checks
it is bitwise equal to what was saved, resumes training from both and checks the losses agree, and
prints the loop's blocking time per save next to ``torch.save`` of the same state.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import shutil
import statistics
import tempfile
import time
from typing import Any

import torch
from torch import nn

from .client import Checkpointer
from .compare import bitwise_equal
from .reader import load
from .spawn import DaemonProcess


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 8192, width: int = 512, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width),
                nn.Linear(width, 4 * width),
                nn.GELU(),
                nn.Linear(4 * width, width),
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.int64))
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tokens_seen += x.numel()
        h = self.embed(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(self.norm(h))


def _batch(gen: torch.Generator, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, vocab, (4, 32), generator=gen)
    return x, torch.roll(x, -1, dims=1)


def _step(model: TinyLM, opt: torch.optim.Optimizer, sched: Any, gen: torch.Generator) -> float:
    x, y = _batch(gen, model.embed.num_embeddings)
    loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def _make(width: int) -> tuple[TinyLM, torch.optim.Optimizer, Any]:
    model = TinyLM(width=width)
    opt = torch.optim.AdamW(
        [
            {
                "params": [p for n, p in model.named_parameters() if p.ndim >= 2],
                "weight_decay": 0.1,
            },
            {"params": [p for n, p in model.named_parameters() if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=3e-4,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    return model, opt, sched


BUSY_SPREAD = 0.5
"""torch.save times of one state whose (max - min) / median exceeds this: the machine is busy."""


def ratio_line(ckptd_s: float, torch_s: float) -> str:
    """The blocking ratio with its direction, in words (a bare "ratio 1.74" reads both ways)."""
    r = ckptd_s / torch_s if torch_s > 0 else float("inf")
    if r < 1:
        return f"ckptd blocks the loop for {r:.2f}x the time of torch.save"
    return f"ckptd blocks the loop {r:.2f}x longer than torch.save"


def busy_reason(save_times: list[float], load1: float, ncpu: int) -> str | None:
    """Why the figures of this run may not mean much, or None: repeated ``torch.save`` times
    of one state that spread widely, or a 1-minute load average above the CPU count."""
    why = []
    if load1 > ncpu:
        why.append(f"load average {load1:.1f} on {ncpu} CPUs")
    if len(save_times) > 1:
        med = statistics.median(save_times)
        spread = (max(save_times) - min(save_times)) / med if med > 0 else 0.0
        if spread > BUSY_SPREAD:
            why.append(
                f"torch.save of the same state took {min(save_times) * 1e3:.0f} to "
                f"{max(save_times) * 1e3:.0f} ms"
            )
    return "; ".join(why) or None


def run_demo(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    random.seed(0)
    work = args.dir or tempfile.mkdtemp(prefix="ckptd-demo-")
    os.makedirs(work, exist_ok=True)
    root = os.path.join(work, "store")
    sock = os.path.join(work, "ckptd.sock")
    print(f"ckptd demo: working in {work}")
    daemon = DaemonProcess(
        root, sock, args=["--preemption", "off"], log_path=os.path.join(work, "daemon.log")
    )
    ok = removing = False
    try:
        model, opt, sched = _make(args.width)
        gen = torch.Generator().manual_seed(1)
        n_params = sum(p.numel() for p in model.parameters())
        ckpt = Checkpointer("demo", socket=sock)
        blocking: list[float] = []
        saved: dict[str, Any] = {}
        t0 = time.perf_counter()
        for step in range(1, args.steps + 1):
            loss = _step(model, opt, sched, gen)
            if step % args.every == 0:
                extra = {"scheduler": sched.state_dict(), "data_rng": gen.get_state(), "loss": loss}
                t = time.perf_counter()
                ckpt.save(step, model=model, optimizer=opt, extra=extra)  # the one line
                blocking.append(time.perf_counter() - t)
                saved = copy.deepcopy(
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "extra": extra,
                        "step": step,
                    }
                )
                print(
                    f"  step {step:4d}  loss {loss:.4f}  save() blocked {blocking[-1] * 1e3:7.1f} ms"
                )
        train_s = time.perf_counter() - t0
        ckpt.flush("uploaded", timeout=300)
        ckpt.close()

        # torch.save of the same state, to the same disk, for comparison.
        ts: list[float] = []
        state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        nbytes = 0
        for _ in range(3):
            path = os.path.join(work, "torch_save.pt")
            t = time.perf_counter()
            torch.save(state, path)
            ts.append(time.perf_counter() - t)
            nbytes = os.path.getsize(path)
            os.unlink(path)

        # Restore into fresh objects and compare bit for bit with what was saved.
        model2, opt2, sched2 = _make(args.width)
        ckpt2 = Checkpointer("demo", socket=sock)
        meta = ckpt2.restore(model2, opt2)
        ckpt2.close()
        assert meta is not None, "no checkpoint found"
        sched2.load_state_dict(meta["extra"]["scheduler"])
        same_model = bitwise_equal(model2.state_dict(), saved["model"])
        same_opt = bitwise_equal(opt2.state_dict(), saved["optimizer"])
        loaded = load(os.path.join(root, "demo"))
        same_extra = bitwise_equal(loaded["extra"]["data_rng"], saved["extra"]["data_rng"])
        tied = model2.head.weight.data_ptr() == model2.embed.weight.data_ptr()

        # Resume both for a few steps: identical losses means training resumes exactly.
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["extra"]["scheduler"])
        g1 = torch.Generator()
        g1.set_state(saved["extra"]["data_rng"])
        g2 = torch.Generator()
        g2.set_state(meta["extra"]["data_rng"])
        l1 = [_step(model, opt, sched, g1) for _ in range(3)]
        l2 = [_step(model2, opt2, sched2, g2) for _ in range(3)]
        resumed = l1 == l2

        code = daemon.stop()
        med_block = statistics.median(blocking[1:] or blocking)
        med_save = statistics.median(ts)
        ok = same_model and same_opt and same_extra and tied and resumed and code == 0
        removing = ok and not args.keep and not args.dir
        print()
        print(
            f"model: {n_params / 1e6:.1f} M parameters (tied embeddings) + AdamW state = "
            f"{nbytes / 2**20:.0f} MiB per checkpoint; {len(blocking)} saves in {train_s:.1f} s of training"
        )
        print(
            f"loop blocking time per save (median): ckptd {med_block * 1e3:.1f} ms   "
            f"torch.save {med_save * 1e3:.1f} ms  "
            f"(first save, which allocates the staging arena: {blocking[0] * 1e3:.1f} ms)"
        )
        print(ratio_line(med_block, med_save))
        busy = busy_reason(ts, os.getloadavg()[0], os.cpu_count() or 1)
        if busy:
            print(f"note: the machine looks busy ({busy}): the ratio above means little here")
        print(
            f"restored {meta['tag']} (step {meta['step']}): model bitwise equal: {same_model}, "
            f"optimizer bitwise equal: {same_opt}, extras equal: {same_extra}, ties kept: {tied}"
        )
        print(
            f"resumed 3 steps from the original and from the restore: identical losses: {resumed}"
        )
        print(f"daemon drained and exited with {code}")
        print("demo OK" if ok else "demo FAILED")
        return 0 if ok else 1
    finally:
        daemon.kill()
        where = os.path.join(root, "demo", "checkpoints")
        if removing:
            shutil.rmtree(work, ignore_errors=True)
        if os.path.isdir(where):
            print(f"checkpoints in {where}" + ("" if ok else f"; daemon log: {work}/daemon.log"))
        elif os.path.isdir(work):
            print(f"no checkpoints in {where}; kept {work}, daemon log: {work}/daemon.log")
        else:
            print(f"removed {work} and the checkpoints in it (--keep or --dir keeps them)")


__all__ = ["TinyLM", "busy_reason", "ratio_line", "run_demo"]
