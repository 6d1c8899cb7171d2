"""Synthetic image-text pairs for smoke runs, tests and throughput benchmarks.

    python -m clip_pl.train model=tiny data=synthetic trainer.max_steps=20

Each sample is a deterministic function of (seed, index): a random image and a random token
sequence of random length, so two processes asked for the same index agree exactly (the
single-process vs multi-process equality tests rely on that).
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

_SOT, _EOT = 49406, 49407  # open_clip's start/end-of-text ids: the text tower pools at the EOT token
_VOCAB_WORDS = 49405  # ordinary BPE ids live below the special tokens


class SyntheticPairs(Dataset):
    def __init__(self, num_samples: int, image_size: int, context_length: int, seed: int = 0):
        self.num_samples = num_samples
        self.image_size = image_size
        self.context_length = context_length
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        image = torch.randn(3, self.image_size, self.image_size, generator=gen)
        length = int(torch.randint(3, self.context_length + 1, (1,), generator=gen))
        text = torch.zeros(self.context_length, dtype=torch.long)
        text[0] = _SOT
        text[1 : length - 1] = torch.randint(1, _VOCAB_WORDS, (length - 2,), generator=gen)
        text[length - 1] = _EOT
        return {"image": image, "text": text}


class SyntheticDataModule(L.LightningDataModule):
    """Random pairs; Lightning's DistributedSampler splits them across ranks."""

    def __init__(self, batch_size: int = 32, num_samples: int = 100_000, image_size: int = 224,
                 context_length: int = 77, num_workers: int = 0, seed: int = 0):
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"data.batch_size={batch_size} must be positive.")
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.image_size = image_size
        self.context_length = context_length
        self.num_workers = num_workers
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        dataset = SyntheticPairs(self.num_samples, self.image_size, self.context_length, self.seed)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def batches_per_epoch(self, world_size: int = 1) -> int:
        return self.num_samples // (self.batch_size * world_size)
