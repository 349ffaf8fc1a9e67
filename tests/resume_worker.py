"""A training job for the resume tests, run as its own process so a test can SIGKILL it.

``python -m tests.resume_worker {hf,pl} --run RUN --socket SOCK --out DIR --records FILE``:
a tiny model trains on CPU with fixed seeds, saving through the daemon at ``SOCK`` with ckptd's
integration, resuming from the run's newest checkpoint (the one line the README shows). Every
logged step appends ``{"step", "loss", "lr"}`` to ``FILE``; at the end ``FILE.final.json`` holds
what the framework kept (HF's ``log_history``; Lightning's checkpoint callback view).

``CKPTD_TEST_HANG_AT=N`` makes the job stop still after step N (writing ``FILE.hung``) until it
is killed: the same command line, killed at a known point.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from typing import Any

import torch

from ckptd import Checkpointer

STEPS = 8
SAVE_EVERY = 2


def _append(path: str, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _hang(records: str, step: int, flush: Any = None) -> None:
    if os.environ.get("CKPTD_TEST_HANG_AT") == str(step):
        if flush is not None:
            flush()
        with open(f"{records}.hung", "w") as f:
            f.write(str(step))
        threading.Event().wait()  # until SIGKILL


def hf(args: argparse.Namespace) -> None:
    import transformers

    from ckptd.integrations.hf import CkptdCallback, resume_checkpoint

    transformers.set_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.1,
        embd_pdrop=0.1, attn_pdrop=0.1,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (24, 16), generator=gen)
    data = [{"input_ids": row, "labels": row} for row in ids]
    targs = transformers.TrainingArguments(
        output_dir=args.out,
        max_steps=STEPS,
        per_device_train_batch_size=4,  # 6 steps an epoch: the resume at step 4 is mid-epoch
        learning_rate=1e-3,
        warmup_steps=3,
        save_strategy="steps",
        save_steps=SAVE_EVERY,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )

    class Record(transformers.TrainerCallback):  # type: ignore[misc]
        def on_log(self, a: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                _append(args.records, {"step": state.global_step, "loss": logs["loss"],
                                       "lr": logs["learning_rate"],
                                       "grad_norm": logs.get("grad_norm")})  # fmt: skip

        def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            if not control.should_save:
                _hang(args.records, state.global_step)

    with Checkpointer(args.run, socket=args.socket) as ckpt:
        cb = CkptdCallback(ckpt)
        trainer = transformers.Trainer(
            model=model, args=targs, train_dataset=data, callbacks=[cb, Record()]
        )
        resumed = resume_checkpoint(args.out, ckpt)
        trainer.train(resume_from_checkpoint=resumed)
        for h in cb.handles:
            h.wait("uploaded", timeout=60)
    history = [
        {k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k}
        for e in trainer.state.log_history
    ]
    with open(f"{args.records}.final.json", "w") as f:
        json.dump(
            {"log_history": history, "global_step": trainer.state.global_step, "resumed": resumed},
            f,
        )


def pl(args: argparse.Namespace) -> None:
    try:
        import lightning.pytorch as lp
    except ImportError:
        import pytorch_lightning as lp

    from ckptd.integrations.lightning import CkptdCheckpointIO

    lp.seed_everything(0, verbose=False)

    class Tiny(lp.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
            )

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
            sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.8)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def train_dataloader(self) -> Any:
            gen = torch.Generator().manual_seed(0)
            data = torch.utils.data.TensorDataset(
                torch.randn(16, 8, generator=gen), torch.randn(16, 1, generator=gen)
            )
            return torch.utils.data.DataLoader(data, batch_size=8)  # 2 steps an epoch

    class Record(lp.Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, out: Any, b: Any, i: int) -> None:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            _append(args.records, {"step": trainer.global_step, "loss": float(out["loss"]),
                                   "lr": lr})  # fmt: skip
            _hang(args.records, trainer.global_step, io.wait_deletions)

    mc = lp.callbacks.ModelCheckpoint(
        dirpath=os.path.join(args.out, "ckpts"),
        every_n_train_steps=SAVE_EVERY,
        save_top_k=2,
        monitor="train_loss",
        save_last=True,
    )
    with Checkpointer(args.run, socket=args.socket) as ckpt:
        io = CkptdCheckpointIO(ckpt)
        trainer = lp.Trainer(
            max_steps=STEPS,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=args.out,
            plugins=[io],
            callbacks=[mc, Record()],
        )
        trainer.fit(Tiny(), ckpt_path=io.resume_path())
        io.wait_deletions()
        for h in io.handles.values():
            h.wait("uploaded", timeout=60)
    with open(f"{args.records}.final.json", "w") as f:
        json.dump(
            {
                "global_step": trainer.global_step,
                "best_k": {os.path.basename(k): float(v) for k, v in mc.best_k_models.items()},
                "stubs": io.live_tags(),
                "resumed": trainer.ckpt_path,
            },
            f,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("framework", choices=["hf", "pl"])
    parser.add_argument("--run", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--records", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    {"hf": hf, "pl": pl}[args.framework](args)


if __name__ == "__main__":
    main()


# ---- the test side: run the job, kill it, rerun it -------------------------------------------


def command(framework: str, run: str, sock: str, out: str, records: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "tests.resume_worker", framework, "--run", run,
            "--socket", sock, "--out", out, "--records", records]  # fmt: skip


def run_to_end(cmd: list[str], timeout: float = 120) -> None:
    """Run the job to its end (bounded); its output is shown when it fails."""
    import subprocess

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{cmd[3]} job failed ({done.returncode}):\n{done.stderr[-6000:]}")


def run_until_killed(cmd: list[str], hang_at: int, ready: Any, timeout: float = 120) -> None:
    """Start the job, wait (bounded) until it stands still after step ``hang_at`` and
    ``ready()`` holds, then SIGKILL its whole process group."""
    import signal
    import subprocess
    import time

    records = cmd[cmd.index("--records") + 1]
    env = {**os.environ, "CKPTD_TEST_HANG_AT": str(hang_at)}
    with open(f"{records}.stderr", "wb") as err:
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        while not (os.path.exists(f"{records}.hung") and ready()):
            if proc.poll() is not None:
                with open(f"{records}.stderr", errors="replace") as f:
                    tail = f.read()[-6000:]
                raise AssertionError(f"job exited ({proc.returncode}) before the kill:\n{tail}")
            if time.monotonic() > deadline:
                raise AssertionError("job did not reach the kill point in time")
            time.sleep(0.05)  # polling interval, not synchronization
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def read_records(path: str) -> dict[int, dict[str, Any]]:
    """Step -> record; a rerun's later record of a step wins."""
    out: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            out[int(rec["step"])] = rec
    return out
