"""Tiny Lightning runs of CLIPModule on fixed random pairs, shared by the tower and EMA tests."""

from __future__ import annotations

import functools

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from clip_pl.loss import ClipLoss
from clip_pl.model import resolve_model_config
from clip_pl.module import CLIPModule

# Two blocks per tower, so that "the last N layers / groups" and depths mean something.
TINY2 = dict(
    embed_dim=8,
    vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=2, head_width=16),
    text_cfg=dict(context_length=8, vocab_size=1000, width=32, heads=2, layers=2),
)
BASE_LR = 1e-3


class Pairs(Dataset):
    """Fixed random image-text pairs; rank r of W reads rows r::W of each global batch."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, global_batch: int = 8):
        gen = torch.Generator().manual_seed(123)
        self.images = torch.randn(n, 3, 16, 16, generator=gen)
        self.texts = torch.randint(1, 1000, (n, 8), generator=gen)
        local = global_batch // world_size
        # Rank r's b-th batch = rows [b·G + r·local, b·G + (r+1)·local): together the same global batch.
        self.rows = [b * global_batch + rank * local + i for b in range(n // global_batch) for i in range(local)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        return {"image": self.images[row], "text": self.texts[row]}


def make_module(lock=None, tower_lr=None, scheduler=None, arch_config=TINY2) -> CLIPModule:
    torch.manual_seed(0)
    return CLIPModule(
        model_config=resolve_model_config(arch_config=arch_config),
        loss=ClipLoss(),
        optimizer=functools.partial(torch.optim.AdamW, lr=BASE_LR, weight_decay=0.2),
        scheduler=scheduler,
        lock=lock,
        tower_lr=tower_lr,
    )


def fit(
    module: CLIPModule,
    steps: int,
    callbacks=(),
    rank: int = 0,
    world_size: int = 1,
    ckpt_path=None,
    root=None,
    global_batch: int = 8,
    samples: int = 40,
) -> L.Trainer:
    """``steps`` optimizer steps of ``module`` on Pairs (5 batches an epoch, no shuffling)."""
    loader = DataLoader(Pairs(samples, rank, world_size, global_batch), batch_size=global_batch // world_size)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy="ddp" if world_size > 1 else "auto",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        callbacks=list(callbacks),
        default_root_dir=root,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def snapshot(module: CLIPModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}
