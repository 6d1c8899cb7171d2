"""Synthetic image-text pairs for smoke runs, tests and throughput benchmarks.

    python -m clip_pl.train debug=smoke      # model=tiny data=synthetic trainer=cpu, 20 steps

Each sample is a deterministic function of (seed, index): a random uint8 image (the loaders' batch
contract: ``CLIPModule.on_after_batch_transfer`` normalises it on the device) and a random token
sequence of random length. Global batch t holds samples [t·W·b, (t+1)·W·b) and rank r takes rows
[r·b, (r+1)·b) of it, so W processes with b each see exactly the samples one process sees with
W·b (the single-process vs multi-process equality tests rely on that).
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clip_pl.data.workers import worker_options

_SOT, _EOT = 49406, 49407  # open_clip's start/end-of-text ids: the text tower pools at the EOT token
_VOCAB_WORDS = 49405  # ordinary BPE ids live below the special tokens


class SyntheticPairs(IterableDataset):
    def __init__(
        self,
        num_samples: int,
        image_size: int,
        context_length: int,
        seed: int = 0,
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.image_size = image_size
        self.context_length = context_length
        self.seed = seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_batches = num_samples // (batch_size * world_size)  # full global batches only

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self):
        worker = get_worker_info()
        first, step = (worker.id, worker.num_workers) if worker else (0, 1)
        for t in range(first, self.num_batches, step):  # the DataLoader reads workers round-robin
            start = (t * self.world_size + self.rank) * self.batch_size
            for index in range(start, start + self.batch_size):
                yield self.sample(index)

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        image = torch.randint(0, 256, (3, self.image_size, self.image_size), dtype=torch.uint8, generator=gen)
        length = int(torch.randint(3, self.context_length + 1, (1,), generator=gen))
        text = torch.zeros(self.context_length, dtype=torch.long)
        text[0] = _SOT
        text[1 : length - 1] = torch.randint(1, _VOCAB_WORDS, (length - 2,), generator=gen)
        text[length - 1] = _EOT
        return {"image": image, "text": text}


class SyntheticDataModule(L.LightningDataModule):
    """Random pairs, split across ranks by rows of each global batch."""

    def __init__(
        self,
        batch_size: int = 32,
        num_samples: int = 100_000,
        image_size: int = 224,
        context_length: int = 77,
        num_workers: int = 0,
        seed: int = 0,
    ):
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
        trainer = self.trainer  # None when used without a Trainer (benchmarks, tests)
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        dataset = SyntheticPairs(
            self.num_samples,
            self.image_size,
            self.context_length,
            self.seed,
            batch_size=self.batch_size,
            rank=rank,
            world_size=world_size,
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **worker_options(self.num_workers, rank),
        )

    def batches_per_epoch(self, world_size: int = 1) -> int:
        return self.num_samples // (self.batch_size * world_size)
