"""LightningDataModule over WebDataset shards (img2dataset layout), resumable mid-epoch.

    python -m clip_pl.train data=wds data.train_shards='/data/cc3m/{00000..00331}.tar' \\
        data.batch_size=256 data.num_workers=8
    python -m clip_pl.train data=wds data.resampled=true data.num_samples=10000000 \\
        data.train_shards='pipe:aws s3 cp s3://b/laion/{00000..41455}.tar -::/data/cc12m' \\
        data.train_weights='3::1' data.sizes_file=null

Every batch is ``{"image": B×3×H×W float, "text": B×L long, "bad_samples": {reason: n}}``;
``bad_samples`` holds what the worker that made the batch skipped or converted since its previous
batch: sum them over batches and over ranks to get the totals. ``state_dict`` records
(epoch, batches consumed); a checkpoint resumed mid-epoch continues that epoch where it stopped.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from clip_pl.data.decode import DEFAULT_MAX_IMAGE_PIXELS
from clip_pl.data.shardspec import ShardSet, resolve_shards, resolve_shards_once
from clip_pl.data.stream import WebDatasetStream
from clip_pl.distributed import rank_and_world_size
from clip_pl.model import get_tokenizer, image_transforms
from clip_pl.preemption import WorkerInit

log = logging.getLogger(__name__)

# Lightning warns that an IterableDataset's __len__ may be wrong with several workers; ours is
# exact by construction (each worker makes a known share of the rank's batches).
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")


class EpochAwareLoader(DataLoader):
    """A DataLoader that, each time an epoch starts iterating, publishes (epoch, resume point) to workers."""

    def __init__(self, dataset: WebDatasetStream, position_fn, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self._position_fn = position_fn

    def __iter__(self):
        epoch, consumed = self._position_fn()
        self.dataset.position.set(epoch, consumed)
        return super().__iter__()


class WebDatasetDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_shards: str | Sequence[str],
        val_shards: str | Sequence[str] | None = None,
        batch_size: int = 256,
        num_workers: int = 8,
        num_samples: int | None = None,
        resampled: bool = False,
        seed: int = 0,
        image_size: int = 224,
        context_length: int = 77,
        train_weights: str | Sequence[float] | None = None,
        sizes_file: str | None = None,
        val_sizes_file: str | None = None,
        shuffle_buffer: int = 1000,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        prefetch_factor: int = 2,
        pin_memory: bool | None = None,
        multiprocessing_context: str | None = "fork",
        return_keys: bool = False,
        record_keys: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1 and data.num_workers={num_workers} >= 0.")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"data.num_samples={num_samples} must be a positive number of samples per epoch.")
        self.train_spec, self.val_spec = train_shards, val_shards
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.num_samples, self.resampled, self.seed = num_samples, bool(resampled), int(seed)
        self.image_size, self.context_length = int(image_size), int(context_length)
        self.train_weights = train_weights
        self.sizes_file, self.val_sizes_file = sizes_file, val_sizes_file
        self.shuffle_buffer, self.max_image_pixels = int(shuffle_buffer), int(max_image_pixels)
        self.prefetch_factor = int(prefetch_factor)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        # fork: workers start in milliseconds and share the parsed shard list; it is what a rank launched by
        # srun/torchrun gets on Linux anyway, also when the rank itself was spawned (as in the tests).
        self.multiprocessing_context = multiprocessing_context if hasattr(os, "fork") else None
        # record_keys: batches carry their samples' __key__, which clip_pl.data.keys.KeyRecorder
        # appends to RUN_DIR/keys/rank<r>.jsonl for `python -m clip_pl.data.audit`.
        self.record_keys = bool(record_keys)
        self.return_keys = bool(return_keys) or self.record_keys
        self._train_set: ShardSet | None = None
        self._val_set: ShardSet | None = None
        self._resume: dict | None = None
        self._anchor: tuple[int, int, int | None] = (0, 0, 0)  # (epoch, batches consumed, global step) of the start
        self._epochs_iterated = 0  # epoch counter when no Trainer drives the loader
        if not self.resampled and train_weights is not None:
            weights = resolve_shards(train_shards, train_weights, sizes_file).weights
            if len(set(weights)) > 1:
                raise ValueError("data.train_weights only apply with data.resampled=true: exact epochs read "
                                 "every sample once. Set data.resampled=true and data.num_samples.")

    # ---- topology ----------------------------------------------------------------------------
    def _topology(self) -> tuple[int, int]:
        trainer = self._trainer_or_none()
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return rank_and_world_size()

    def _trainer_or_none(self):
        return getattr(self, "trainer", None)

    # ---- sizes -------------------------------------------------------------------------------
    def _train_shards(self) -> ShardSet:
        if self._train_set is None:  # first called from setup(), on every rank: rank 0 lists, the others receive
            self._train_set = resolve_shards_once(self.train_spec, self.train_weights, self.sizes_file)
        return self._train_set

    def epoch_samples(self) -> int:
        shards = self._train_shards()
        total = shards.total_samples
        if self.resampled:
            if self.num_samples is None and total is None:
                raise ValueError("data.resampled=true needs the epoch length: set data.num_samples, or provide "
                                 f"sizes.json for every shard (missing: {shards.missing_sizes()[:3]}).")
            return int(self.num_samples or total)
        if total is None:
            raise ValueError("exact epochs (data.resampled=false) need sizes.json for every shard (missing: "
                             f"{shards.missing_sizes()[:3]}); set data.sizes_file or data.resampled=true.")
        return min(total, self.num_samples) if self.num_samples else total

    def batches_per_epoch(self, world_size: int | None = None) -> int:
        """Full batches each rank yields per epoch (the same on every rank)."""
        world = world_size or self._topology()[1]
        return self.epoch_samples() // (world * self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch()

    # ---- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        rank, world = self._topology()
        samples = self.epoch_samples()
        batches = samples // (world * self.batch_size)
        if batches < 1:
            raise ValueError(f"data: an epoch of {samples} samples is less than one global batch "
                             f"({world} ranks × data.batch_size={self.batch_size}); lower data.batch_size "
                             "or add shards / data.num_samples.")
        if rank == 0:
            left = samples - batches * world * self.batch_size
            log.info("data: %d batches per rank per epoch (%d ranks × %d); %d samples of each epoch's order "
                     "left out (resampled=%s)", batches, world, self.batch_size, left, self.resampled)
        if self.val_spec is not None and self._val_set is None:
            self._val_set = resolve_shards_once(self.val_spec, None, self.val_sizes_file)
            if not self._val_set.sizes_known:
                raise ValueError(f"data.val_shards need sizes.json (missing: {self._val_set.missing_sizes()[:3]}); "
                                 "set data.val_sizes_file.")

    def train_dataloader(self) -> DataLoader:
        rank, world = self._topology()
        train_tf, _ = image_transforms(self.image_size)
        stream = WebDatasetStream(
            self._train_shards(), batch_size=self.batch_size, batches_per_rank=self.batches_per_epoch(world),
            rank=rank, world_size=world, transform=train_tf, tokenizer=get_tokenizer(self.context_length),
            image_size=self.image_size, resampled=self.resampled, shuffle=True, seed=self.seed,
            shuffle_buffer=self.shuffle_buffer, max_image_pixels=self.max_image_pixels,
            epoch_samples=self.epoch_samples(), return_keys=self.return_keys)
        return self._loader(stream, self._train_position)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_spec is None:
            return []
        if self._val_set is None:
            self.setup("validate")
        rank, world = self._topology()
        total = self._val_set.total_samples  # type: ignore[union-attr]
        batches = total // (world * self.batch_size)
        if batches < 1:
            raise ValueError(f"data.val_shards hold {total} samples, less than one global batch "
                             f"({world} × {self.batch_size}).")
        _, eval_tf = image_transforms(self.image_size)
        stream = WebDatasetStream(
            self._val_set, batch_size=self.batch_size, batches_per_rank=batches, rank=rank, world_size=world,  # type: ignore[arg-type]
            transform=eval_tf, tokenizer=get_tokenizer(self.context_length), image_size=self.image_size,
            resampled=False, shuffle=False, seed=self.seed, max_image_pixels=self.max_image_pixels,
            return_keys=self.return_keys)
        return self._loader(stream, lambda: (0, 0))

    def _loader(self, stream: WebDatasetStream, position_fn) -> DataLoader:
        # WorkerInit: workers ignore SIGUSR1/SIGTERM (forked, they would run the trainer's handlers).
        extra = {"prefetch_factor": self.prefetch_factor, "persistent_workers": True,
                 "multiprocessing_context": self.multiprocessing_context,
                 "worker_init_fn": WorkerInit(self._topology()[0])} if self.num_workers else {}
        return EpochAwareLoader(stream, position_fn, num_workers=self.num_workers,
                                pin_memory=self.pin_memory, **extra)

    def _train_position(self) -> tuple[int, int]:
        """(epoch, batches to skip) for the epoch that is starting."""
        trainer = self._trainer_or_none()
        if trainer is not None:
            return self._position_at(int(trainer.global_step))
        epoch = self._epochs_iterated
        self._epochs_iterated += 1
        resume, self._resume = self._resume, None  # a resume point applies to one epoch only
        if resume is not None and resume["epoch"] == epoch:
            return epoch, resume["batches_consumed"]
        return epoch, 0

    def _position_at(self, global_step: int) -> tuple[int, int]:
        """(epoch, batches of it consumed) after ``global_step`` optimizer steps.

        Every epoch has exactly ``batches_per_epoch`` batches (one optimizer step each), so the position
        follows from the step alone, counted from the resume point (``_anchor``: the checkpoint's epoch,
        batches consumed and step). Not from Lightning's epoch counter: restarted from a checkpoint
        saved on an epoch's last batch, that counter counts the finished epoch twice and the run would
        skip an epoch's data order.
        """
        epoch, consumed, step = self._anchor
        if step is None:  # a checkpoint of an older version: its position is that of the restored step
            step = global_step
            self._anchor = (epoch, consumed, step)
        total = consumed + (global_step - step)
        per_epoch = self.batches_per_epoch()
        return epoch + total // per_epoch, total % per_epoch

    # ---- resume ------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        rank, world = self._topology()
        return {"world_size": world, "batch_size": self.batch_size, "num_workers": self.num_workers,
                "seed": self.seed, "resampled": self.resampled,
                "num_shards": len(self._train_shards().shards), "epoch_samples": self.epoch_samples()}

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer_or_none()
        if trainer is None:
            return {}
        # global_step already counts the batch whose on_train_batch_end is saving this checkpoint right
        # now; a checkpoint of an epoch's last batch says (next epoch, 0).
        step = int(trainer.global_step)
        epoch, consumed = self._position_at(step)
        return {"epoch": epoch, "batches_consumed": consumed, "global_step": step, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if not self.resampled:
            now = self._fingerprint()
            changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
            if changed and state.get("batches_consumed", 0) > 0:
                raise ValueError(
                    f"data: this checkpoint stopped mid-epoch with other loader settings {changed} "
                    "(saved, now). Exact epochs can only continue with the same world size, batch size, "
                    "num_workers, seed and shards; resume with those, or from an end-of-epoch checkpoint.")
        self._resume = {"epoch": int(state["epoch"]), "batches_consumed": int(state["batches_consumed"])}
        step = state.get("global_step")
        self._anchor = (int(state["epoch"]), int(state["batches_consumed"]), None if step is None else int(step))

    def resume_from(self, epoch: int, batches_consumed: int) -> None:
        """Continue ``epoch`` after ``batches_consumed`` batches (what load_state_dict does, for loops without Lightning)."""
        self._resume = {"epoch": int(epoch), "batches_consumed": int(batches_consumed)}
        self._epochs_iterated = int(epoch)
