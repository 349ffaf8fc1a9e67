"""Lightning and Transformers run for a few CPU steps, saving through a real daemon; what the
daemon wrote restores bit for bit. Tiny models are built from configs in code: no downloads."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ckptd
from ckptd import Checkpointer
from ckptd.experiment import Experiment
from tests.helpers import bitwise_equal


def read_stub(path: str) -> dict:  # type: ignore[type-arg]
    from ckptd.integrations.lightning import read_stub as read

    stub = read(path)
    assert stub is not None, path
    return stub


def _dataset(n: int = 24) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(
        torch.randn(n, 8, generator=gen), torch.randn(n, 1, generator=gen)
    )


# ---- PyTorch Lightning -------------------------------------------------------------------------


def _lightning():  # type: ignore[no-untyped-def]
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning")
    from ckptd.integrations.lightning import CkptdCheckpointIO, CkptdExperimentCallback

    class Tiny(pl.LightningModule):
        def __init__(self, width: int = 16) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)
            )

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 2)}

        def train_dataloader(self):  # type: ignore[no-untyped-def]
            return torch.utils.data.DataLoader(_dataset(), batch_size=8)

    return pl, Tiny, CkptdCheckpointIO, CkptdExperimentCallback


def _trainer(pl, tmp_path, io, callbacks, max_epochs: int):  # type: ignore[no-untyped-def]
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        plugins=[io],
        callbacks=callbacks,
    )


def test_lightning_checkpoint_io_and_records(daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pl, Tiny, CkptdCheckpointIO, CkptdExperimentCallback = _lightning()
    torch.manual_seed(0)
    exp = Experiment("pl", "tiny", socket=daemon.socket, capture_logs=False)
    io = CkptdCheckpointIO(exp.checkpointer)
    mc = pl.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path / "ckpts"), every_n_train_steps=2, save_top_k=-1, save_last=True
    )
    model = Tiny()
    trainer = _trainer(pl, tmp_path, io, [mc, CkptdExperimentCallback(exp)], max_epochs=2)
    trainer.fit(model)
    assert trainer.global_step == 6

    run = os.path.join(daemon.root, exp.run)
    tags = {m["tag"]: m["step"] for m in ckptd.list_checkpoints(run)}
    assert set(tags) == {"epoch=0-step=2_U2", "epoch=1-step=4_U4", "epoch=1-step=6_U6"}
    # save_last is a stub naming the top-k save of the same step, not a second upload.
    assert read_stub(mc.last_model_path)["tag"] == "epoch=1-step=6_U6"
    # What the daemon wrote, read back through the plugin, is the trained state bit for bit.
    back = io.load_checkpoint(mc.last_model_path)
    assert bitwise_equal(back["state_dict"], model.state_dict())
    assert bitwise_equal(back["optimizer_states"][0], trainer.optimizers[0].state_dict())
    assert back["global_step"] == 6 and back["epoch"] == 1
    assert back["lr_schedulers"][0] == trainer.lr_scheduler_configs[0].scheduler.state_dict()
    # ...and through ckptd.load, with no Lightning at all.
    assert bitwise_equal(ckptd.load(run, tag="epoch=1-step=6_U6")["model"], model.state_dict())
    # The records: metrics at each step, hparams, finished.
    with open(exp.path("metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2, 3, 4, 5, 6]
    with open(exp.path("results", "hyperparameters.json")) as f:
        assert json.load(f) == {"width": 16}
    with open(exp.path("run.json")) as f:
        assert json.load(f)["status"] == "finished"

    # Lightning resumes from the stub: one more epoch continues at step 6.
    with Checkpointer(exp.run, socket=daemon.socket) as ckpt:
        io2 = CkptdCheckpointIO(ckpt, wait="committed")
        resumed = Tiny()
        t2 = _trainer(
            pl, tmp_path, io2, [pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpts2"))], 3
        )
        t2.fit(resumed, ckpt_path=mc.last_model_path)
        assert t2.global_step == 9
    assert "epoch=2-step=9_U9" in {m["tag"] for m in ckptd.list_checkpoints(run)}


# ---- Hugging Face Transformers -------------------------------------------------------------------


def test_hf_trainer_callback(daemon, tmp_path) -> None:  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from ckptd.integrations.hf import CkptdCallback

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (16, 16), generator=gen)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    with Checkpointer("hf/tiny", socket=daemon.socket) as ckpt:
        cb = CkptdCallback(ckpt)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
        trainer.train()
        for h in cb.handles:
            h.wait("committed", timeout=60)
    run = os.path.join(daemon.root, "hf/tiny")
    assert [m["tag"] for m in ckptd.list_checkpoints(run)] == ["checkpoint-2", "checkpoint-4"]
    state = ckptd.load(run, tag="checkpoint-4")
    assert bitwise_equal(state["model"], model.state_dict())
    assert bitwise_equal(state["optimizer"], trainer.optimizer.state_dict())
    assert state["extra"]["scheduler"] == trainer.lr_scheduler.state_dict()
    assert state["extra"]["trainer_state"]["global_step"] == 4
    assert (
        state["model"]["transformer.wte.weight"].data_ptr()
        == state["model"]["lm_head.weight"].data_ptr()
    )

    # Restore into a fresh model of the same config: equal to the trained one.
    fresh = transformers.GPT2LMHeadModel(config)
    with Checkpointer("hf/tiny", socket=daemon.socket) as ckpt:
        meta = ckpt.restore(model=fresh, tag="checkpoint-4")
    assert meta is not None and meta["step"] == 4
    assert bitwise_equal(fresh.state_dict(), model.state_dict())
