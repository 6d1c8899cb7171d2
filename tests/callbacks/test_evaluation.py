"""Evaluation callbacks inside a real Lightning fit: when they run, what they log, and that under
DDP (2 gloo processes) every rank takes part and gets the single-process numbers.

    pytest tests/callbacks/test_evaluation.py
"""

from __future__ import annotations

import csv
import os

import lightning.pytorch as pl
import open_clip
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from clip_pl.callbacks.evaluation import RetrievalCallback, ZeroShotCallback
from clip_pl.eval.zeroshot import zero_shot_evaluate
from clip_pl.model import build_clip, resolve_model_config
from tests.support.distributed import run_distributed
from tests.support.eval import (
    CLASSNAMES,
    TEMPLATES,
    TINY_VIT,
    caption_samples,
    captions_for,
    random_images,
    write_imagefolder,
    write_shards,
)


class RandomPairs(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int):
        gen = torch.Generator().manual_seed(index)
        tokens = torch.zeros(16, dtype=torch.long)
        tokens[0], tokens[1:5], tokens[5] = 49406, torch.randint(1, 49000, (4,), generator=gen), 49407
        return torch.randn(3, 32, 32, generator=gen), tokens


class TinyCLIPModule(pl.LightningModule):
    """Just what the callbacks rely on: ``model`` (open_clip CLIP) and ``model_config``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model_config = resolve_model_config(arch_config=TINY_VIT)
        self.model = build_clip(self.model_config)
        self.loss = open_clip.ClipLoss()
        self.train_mode_seen: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.train_mode_seen.append(self.model.training)
        images, tokens = batch
        return self.loss(*self.model(images, tokens)[:3])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        return DataLoader(RandomPairs(), batch_size=4)


def _make_data(root):
    images = random_images(9, seed=11)
    folder = write_imagefolder(root / "folder", images, [i % len(CLASSNAMES) for i in range(9)])
    shards = write_shards(root / "shards", caption_samples(images, captions_for([1] * 9)), 2)
    return str(folder), shards


def _fit(root, folder, shards, **trainer_kwargs):
    zeroshot = ZeroShotCallback(
        data=folder,
        classnames=CLASSNAMES,
        templates=TEMPLATES,
        name="digits",
        every_n_steps=2,
        batch_size=4,
        num_workers=0,
    )
    retrieval = RetrievalCallback(
        data=shards, name="coco", every_n_steps=4, at_train_end=False, batch_size=4, num_workers=0, ks=(1, 5)
    )
    module = TinyCLIPModule()
    trainer = pl.Trainer(
        max_steps=5,
        accumulate_grad_batches=2,
        accelerator="cpu",
        logger=CSVLogger(root),
        callbacks=[zeroshot, retrieval],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
        **trainer_kwargs,
    )
    trainer.fit(module)
    return trainer, module, zeroshot, retrieval


def test_callbacks_run_every_n_steps_and_at_the_end(tmp_path):
    folder, shards = _make_data(tmp_path)
    trainer, module, zeroshot, retrieval = _fit(tmp_path, folder, shards, devices=1)
    # accumulate_grad_batches=2: two batches end on each step, yet each step is evaluated once
    assert [step for step, _ in zeroshot.history] == [2, 4, 5]
    assert [step for step, _ in retrieval.history] == [4]
    assert all(module.train_mode_seen) and len(module.train_mode_seen) == 10
    # the end-of-training numbers are those of the final weights
    final = zero_shot_evaluate(module.model, module.model_config, folder, CLASSNAMES, TEMPLATES, batch_size=4)
    assert {k: zeroshot.last_metrics[k] for k in final} == final
    assert trainer.callback_metrics["eval/digits/top1"].item() == pytest.approx(final["top1"])
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    logged = {int(r["step"]): r for r in rows if r.get("eval/digits/top1")}
    assert sorted(logged) == [2, 4, 5]
    assert any(r.get("eval/coco/image_to_text_R@5") for r in rows)


def _ddp_fit(rank: int, world_size: int, root: str, folder: str, shards: list) -> dict:
    from pathlib import Path

    trainer, module, zeroshot, retrieval = _fit(
        Path(root) / f"rank{rank}", folder, shards, devices=world_size, strategy="ddp"
    )
    return {
        "zeroshot": zeroshot.history,
        "retrieval": retrieval.history,
        "weights": {k: v.clone() for k, v in module.model.state_dict().items()},
    }


@pytest.mark.slow  # multi-process or subprocess: > ~10 s on 2 cores (make test-quick leaves it out)
def test_callbacks_under_ddp_shard_and_agree(tmp_path):
    folder, shards = _make_data(tmp_path)
    ranks = run_distributed(_ddp_fit, world_size=2, args=(str(tmp_path), folder, shards))

    def strip(history):
        return [(step, {k: v for k, v in m.items() if k != "seconds"}) for step, m in history]

    assert strip(ranks[0]["zeroshot"]) == strip(ranks[1]["zeroshot"])
    assert strip(ranks[0]["retrieval"]) == strip(ranks[1]["retrieval"])
    assert [step for step, _ in ranks[0]["zeroshot"]] == [2, 4, 5]
    model = build_clip(resolve_model_config(arch_config=TINY_VIT))
    model.load_state_dict(ranks[0]["weights"])
    final = zero_shot_evaluate(
        model, resolve_model_config(arch_config=TINY_VIT), folder, CLASSNAMES, TEMPLATES, batch_size=4
    )
    assert {k: ranks[0]["zeroshot"][-1][1][k] for k in final} == final


def test_sharded_parameter_strategies_are_refused_before_training():
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

    from clip_pl.callbacks.evaluation import check_strategy
    from clip_pl.strategies import FSDP2Strategy

    check_strategy(DDPStrategy())
    check_strategy(DeepSpeedStrategy(stage=2))
    for strategy in (FSDPStrategy(), FSDP2Strategy(), DeepSpeedStrategy(stage=3)):
        with pytest.raises(ValueError, match="python -m clip_pl.eval"):
            check_strategy(strategy)
