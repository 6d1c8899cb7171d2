"""A run stopped on the last batch of an epoch resumes with the next epoch's data, not the one after.

    pytest tests/test_resume_at_epoch_end.py      # ~20 s

Found by tests/slurm/test_preemption_realistic.py: a SIGTERM that landed on the last step of an
epoch made the resumed run read epoch 2's order in place of epoch 1's (Lightning's epoch counter
counted the finished epoch twice on restart). The loader's position now comes from the global step:
every epoch has exactly ``steps_per_epoch`` batches, so (epoch, batches consumed) =
divmod(global_step, steps_per_epoch).
"""

from __future__ import annotations

import os
import signal

import lightning as L
import pytest
import torch

from clip_pl.callbacks.preemption import PreemptionCheckpoint
from clip_pl.data import WebDatasetDataModule
from tests.support.fake_shards import write_shards

BATCH, SAMPLES = 4, 26  # 6 steps per epoch on one rank, 2 samples left out


class KeyModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[tuple[int, list[str]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.global_step + 1, list(batch["key"])))
        return self.layer(batch["image"].float().mean(dim=(1, 2, 3)).unsqueeze(1)).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def _fit(shards, root, max_steps, stop_at=None, ckpt_path=None):
    dm = WebDatasetDataModule(
        train_shards=str(shards),
        batch_size=BATCH,
        num_workers=0,
        image_size=32,
        context_length=16,
        record_keys=True,
        shuffle_buffer=4,
        seed=0,
    )
    model = KeyModel()
    callbacks = [PreemptionCheckpoint(dirpath=str(root))] + ([StopAt(stop_at)] if stop_at else [])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(root),
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.parametrize("stop_at", [6, 5, 7])  # the last batch of epoch 0, and either side of it
def test_resume_after_a_stop_at_the_epoch_end_reads_the_next_epoch(tmp_path, stop_at):
    shards = tmp_path / "shards"
    write_shards(str(shards), [10, 9, 7])
    assert sum([10, 9, 7]) == SAMPLES
    reference = _fit(shards, tmp_path / "ref", max_steps=14)
    first = _fit(shards, tmp_path / "run", max_steps=14, stop_at=stop_at)
    assert [s for s, _ in first] == list(range(1, stop_at + 1))
    second = _fit(shards, tmp_path / "run", max_steps=14, ckpt_path=str(tmp_path / "run" / f"hpc_ckpt_{stop_at}.ckpt"))
    assert first + second == reference
