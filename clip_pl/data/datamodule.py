"""LightningDataModule over WebDataset shards (img2dataset layout), resumable mid-epoch.

    python -m clip_pl.train data=wds data.train_shards='/data/cc3m/{00000..00331}.tar' \\
        data.batch_size=256 data.num_workers=8
    python -m clip_pl.train data=wds data.resampled=true data.num_samples=10000000 \\
        data.train_shards='pipe:aws s3 cp s3://b/laion/{00000..41455}.tar -::/data/cc12m' \\
        data.train_weights='3::1' data.sizes_file=null

Every batch is ``{"image": B×3×H×W uint8, "text": B×L long, "bad_samples": {reason: n}}``: pixels,
normalised on the device by ``CLIPModule.on_after_batch_transfer`` (clip_pl.pixels);
``bad_samples`` holds what the worker that made the batch skipped or converted since its previous
batch: sum them over batches and over ranks to get the totals. ``state_dict`` records
(epoch, batches consumed); a checkpoint resumed mid-epoch continues that epoch where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from clip_pl.data.decode import DEFAULT_MAX_IMAGE_PIXELS
from clip_pl.data.shardspec import ShardSet, resolve_shards, resolve_shards_once
from clip_pl.data.stream import WebDatasetStream
from clip_pl.data.workers import START_METHOD, check_start_method, worker_context, worker_options
from clip_pl.distributed import rank_and_world_size
from clip_pl.model import get_tokenizer, image_transforms

log = logging.getLogger(__name__)

# Lightning warns that an IterableDataset's __len__ may be wrong with several workers; ours is
# exact by construction (each worker makes a known share of the rank's batches).
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")


# "Every batch of this epoch was trained": the loader then skips all of them, however many there are now.
EPOCH_DONE = 2**62


def _saved_batches_per_epoch(state: dict[str, Any]) -> int | None:
    try:
        return int(state["epoch_samples"]) // (int(state["world_size"]) * int(state["batch_size"]))
    except (KeyError, TypeError, ZeroDivisionError):
        return None


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
        multiprocessing_context: str | None = START_METHOD,
        return_keys: bool = False,
        record_keys: bool = False,
        decode_on: str = "cpu",
        resize_on: str | None = None,
    ) -> None:
        super().__init__()
        if decode_on not in ("cpu", "device"):
            raise ValueError(
                f"data.decode_on={decode_on!r}: 'cpu' (workers decode, crop, resize) or 'device' "
                "(workers ship JPEG bytes; the training device decodes them, see docs/data.md)."
            )
        if resize_on not in (None, "worker", "device") or (decode_on == "device" and resize_on == "worker"):
            raise ValueError(
                f"data.resize_on={resize_on!r} with data.decode_on={decode_on}: null (where the decode "
                "runs), 'worker', or 'device' (workers decode and crop, the device resizes the batch); "
                "the device path decodes on the device, so it resizes there too."
            )
        # Training batches only: validation is a few batches, decoded on the CPU path whatever this says.
        self.decode_on, self.resize_on = decode_on, resize_on
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
        # forkserver, not fork: see clip_pl/data/workers.py (a fork of a rank can hang its worker for good).
        check_start_method(multiprocessing_context)  # an unknown one fails here, before any work
        self.multiprocessing_context = multiprocessing_context
        # record_keys: batches carry their samples' __key__, which clip_pl.callbacks.keys.KeyRecorder
        # appends to RUN_DIR/keys/rank<r>.jsonl for `python -m clip_pl.data.audit`.
        self.record_keys = bool(record_keys)
        self.return_keys = bool(return_keys) or self.record_keys
        self._train_set: ShardSet | None = None
        self._val_set: ShardSet | None = None
        self._resume: dict | None = None
        # The data epoch (which shuffle) of the pass being iterated, and of the next one. Counted here,
        # not read from Lightning: resumed from the checkpoint of an epoch's last batch, Lightning
        # counts that epoch as finished twice, and the data would skip an epoch's order.
        self._epoch = 0
        self._next_epoch = 0
        if not self.resampled and train_weights is not None:
            weights = resolve_shards(train_shards, train_weights, sizes_file).weights
            if len(set(weights)) > 1:
                raise ValueError(
                    "data.train_weights only apply with data.resampled=true: exact epochs read "
                    "every sample once. Set data.resampled=true and data.num_samples."
                )

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
                raise ValueError(
                    "data.resampled=true needs the epoch length: set data.num_samples, or provide "
                    f"sizes.json for every shard (missing: {shards.missing_sizes()[:3]})."
                )
            return int(self.num_samples or total)
        if total is None:
            raise ValueError(
                "exact epochs (data.resampled=false) need sizes.json for every shard (missing: "
                f"{shards.missing_sizes()[:3]}); set data.sizes_file or data.resampled=true."
            )
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
        if self.num_workers:
            worker_context(self.multiprocessing_context)  # the forkserver imports its modules while the rank sets up
        rank, world = self._topology()
        samples = self.epoch_samples()
        batches = samples // (world * self.batch_size)
        if batches < 1:
            raise ValueError(
                f"data: an epoch of {samples} samples is less than one global batch "
                f"({world} ranks × data.batch_size={self.batch_size}); lower data.batch_size "
                "or add shards / data.num_samples."
            )
        if rank == 0:
            left = samples - batches * world * self.batch_size
            log.info(
                "data: %d batches per rank per epoch (%d ranks × %d); %d samples of each epoch's order "
                "left out (resampled=%s)",
                batches,
                world,
                self.batch_size,
                left,
                self.resampled,
            )
        if self.val_spec is not None and self._val_set is None:
            self._val_set = resolve_shards_once(self.val_spec, None, self.val_sizes_file, "data.val_shards")
            if not self._val_set.sizes_known:
                raise ValueError(
                    f"data.val_shards need sizes.json (missing: {self._val_set.missing_sizes()[:3]}); "
                    "set data.val_sizes_file."
                )

    def train_dataloader(self) -> DataLoader:
        rank, world = self._topology()
        train_tf, _ = image_transforms(self.image_size)
        stream = WebDatasetStream(
            self._train_shards(),
            batch_size=self.batch_size,
            batches_per_rank=self.batches_per_epoch(world),
            rank=rank,
            world_size=world,
            transform=train_tf,
            tokenizer=get_tokenizer(self.context_length),
            image_size=self.image_size,
            resampled=self.resampled,
            shuffle=True,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            max_image_pixels=self.max_image_pixels,
            epoch_samples=self.epoch_samples(),
            return_keys=self.return_keys,
            decode_on=self.decode_on,
            resize_on=self.resize_on,
        )
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
            raise ValueError(
                f"data.val_shards hold {total} samples, less than one global batch ({world} × {self.batch_size})."
            )
        _, eval_tf = image_transforms(self.image_size)
        stream = WebDatasetStream(
            self._val_set,
            batch_size=self.batch_size,
            batches_per_rank=batches,
            rank=rank,
            world_size=world,  # type: ignore[arg-type]
            transform=eval_tf,
            tokenizer=get_tokenizer(self.context_length),
            image_size=self.image_size,
            resampled=False,
            shuffle=False,
            seed=self.seed,
            max_image_pixels=self.max_image_pixels,
            return_keys=self.return_keys,
        )
        return self._loader(stream, lambda: (0, 0))

    def _loader(self, stream: WebDatasetStream, position_fn) -> DataLoader:
        # Workers start from a forkserver and ignore SIGUSR1/SIGTERM (clip_pl/data/workers.py).
        extra = (
            {
                "prefetch_factor": self.prefetch_factor,
                "persistent_workers": True,
                **worker_options(self.num_workers, self._topology()[0], self.multiprocessing_context),
            }
            if self.num_workers
            else {}
        )
        return EpochAwareLoader(stream, position_fn, num_workers=self.num_workers, pin_memory=self.pin_memory, **extra)

    def _train_position(self) -> tuple[int, int]:
        """(epoch, batches to skip) for the pass over the data that is starting."""
        resume, self._resume = self._resume, None  # a resume point applies to one pass only
        if resume is not None:
            # Resumed after an epoch's last batch, this pass yields nothing: Lightning still runs the
            # rest of that epoch (none) before the next one starts.
            epoch, consumed = resume["epoch"], resume["batches_consumed"]
        else:
            epoch, consumed = self._next_epoch, 0
        self._epoch, self._next_epoch = epoch, epoch + 1
        return epoch, consumed

    # ---- resume ------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        """Every setting that decides which samples batch k of an exact epoch holds: a mid-epoch
        resume is only exact when all of them are unchanged."""
        rank, world = self._topology()
        shards = self._train_shards()
        # The shards' identity, not just their number: the resolved URLs in order, with their sizes.
        listing = json.dumps([[s.url, s.size, s.source] for s in shards.shards])
        return {
            "world_size": world,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "seed": self.seed,
            "resampled": self.resampled,
            "num_shards": len(shards.shards),
            "shards_sha256": hashlib.sha256(listing.encode()).hexdigest(),
            "epoch_samples": self.epoch_samples(),
        }

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer_or_none()
        if trainer is None:
            return {}
        # `processed` counts batches whose training step ran, including the one whose
        # on_train_batch_end is saving this checkpoint right now.
        consumed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self._epoch, "batches_consumed": int(consumed), **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        consumed = int(state["batches_consumed"])
        saved_batches = _saved_batches_per_epoch(state)
        if saved_batches is not None and consumed >= saved_batches:
            # Saved at the epoch's last batch: nothing of it is left, whatever the settings are now.
            self._resume = {"epoch": int(state["epoch"]), "batches_consumed": EPOCH_DONE}
            return
        if not self.resampled:
            now = self._fingerprint()
            changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
            if changed and consumed > 0:
                raise ValueError(
                    f"data: this checkpoint stopped mid-epoch with other loader settings {changed} "
                    "(saved, now). Exact epochs can only continue with the same world size, batch size, "
                    "num_workers, seed, shards (the same files, in the same order, of the same sizes) and epoch "
                    "length (data.num_samples); resume with those, or from an end-of-epoch checkpoint."
                )
        self._resume = {"epoch": int(state["epoch"]), "batches_consumed": consumed}

    def resume_from(self, epoch: int, batches_consumed: int) -> None:
        """Continue ``epoch`` after ``batches_consumed`` batches (what load_state_dict does, for loops without Lightning)."""
        self._resume = {"epoch": int(epoch), "batches_consumed": int(batches_consumed)}
