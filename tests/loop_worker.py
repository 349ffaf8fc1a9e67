"""A tiny training job for the resume tests: ``python -m tests.loop_worker MODE RUN SOCKET OUT
STEPS [DIE_AFTER_SAVES]``.

MODE ``loop`` saves with one line in the loop; ``attach`` saves through ``ckptd.attach``. Each
step appends ``{"step", "loss", "lr"}`` to OUT. With DIE_AFTER_SAVES the job kills itself with
SIGKILL once that many saves are uploaded, as a preempted machine would.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch

import ckptd


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 8, generator=g)
    return x, x.sum(dim=1, keepdim=True)


def main() -> None:
    mode, run, sock, out, steps = sys.argv[1:6]
    die_after = int(sys.argv[6]) if len(sys.argv) > 6 else None
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    saved: list[ckptd.SaveHandle] = []
    if mode == "attach":
        ckpt = ckptd.attach(model, opt, every=2, run=run, socket=sock)
    else:
        ckpt = ckptd.Checkpointer(run, socket=sock)
    meta = ckpt.restore(model, opt)
    start = 0
    if meta is not None:
        start = meta["step"]
        if mode == "loop":
            sched.load_state_dict(meta["extra"]["sched"])
        else:  # attach saved before the scheduler stepped: one step per restored step
            for _ in range(start):
                sched.step()
    with open(out, "a") as log:
        for step in range(start, int(steps)):
            x, y = batch(step)
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            log.write(json.dumps({"step": step, "loss": loss.item(), "lr": lr}) + "\n")
            log.flush()
            done = step + 1
            if mode == "loop" and done % 2 == 0:
                saved.append(
                    ckpt.save(done, model=model, optimizer=opt, extra={"sched": sched.state_dict()})
                )
            if die_after is not None and done // 2 >= die_after and done % 2 == 0:
                if mode == "loop":
                    for h in saved:
                        h.wait("uploaded", timeout=60)
                else:
                    ckpt.flush("uploaded", timeout=60)
                os.kill(os.getpid(), signal.SIGKILL)
    ckpt.close()


if __name__ == "__main__":
    main()
