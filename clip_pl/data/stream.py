"""The per-rank IterableDataset: shards → this rank's and this worker's samples → decoded batches.

Both modes give every rank exactly ``batches_per_rank`` full batches per epoch (so DDP never waits
at epoch end for a rank that ran dry, and the all-gather never sees a partial batch):

* exact epochs (``resampled=False``): the shard list is shuffled by (seed, epoch), concatenated into
  one sequence of sample *positions* (sizes from sizes.json), and cut into contiguous, equal slices:
  rank r, worker w reads positions ``[start, stop)``. Shards are split by position, not by file, so
  uneven shards and fewer shards than ranks × workers need nothing special; the last
  ``N mod (world × batch)`` positions of the epoch's order are left for that epoch (a different
  set each epoch). A position whose sample turns out bad is refilled with a good sample already
  used elsewhere (counted as ``refilled``), so the batch count never depends on the data's health.
* resampled (``resampled=True``): shards are drawn with replacement (per-source weights), seeded by
  (seed, epoch, rank, worker, resume position), until the worker has produced its batches.

Batch j of a rank comes from worker ``j % num_workers`` (the DataLoader visits workers in turn),
which is how a resume knows how many batches each worker must skip.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from multiprocessing.sharedctypes import RawArray
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from clip_pl.data import device_decode, device_resize
from clip_pl.data.batch_rows import StackedRows
from clip_pl.data.batch_transform import BatchedImageTransform, crop_randomness
from clip_pl.data.decode import DEFAULT_MAX_IMAGE_PIXELS, BadSample, decode_caption, decode_pixels
from clip_pl.data.reader import Missing, read_shard
from clip_pl.data.shardspec import Shard, ShardSet

log = logging.getLogger(__name__)

# A resampled worker gives up (with an error) after this many unusable samples in a row: the data is
# then broken as a whole (wrong keys, wrong credentials in a pipe: command), not here and there.
MAX_CONSECUTIVE_BAD = 20_000


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0])


def worker_batches(batches_per_rank: int, num_workers: int, worker: int) -> int:
    """How many of the rank's batches worker ``worker`` makes (batch j goes to worker j % num_workers)."""
    return batches_per_rank // num_workers + (1 if worker < batches_per_rank % num_workers else 0)


def worker_batches_consumed(rank_batches_consumed: int, num_workers: int, worker: int) -> int:
    """How many of the first ``rank_batches_consumed`` batches of the rank came from ``worker``."""
    k = rank_batches_consumed
    return (k - worker + num_workers - 1) // num_workers if k > worker else 0


def worker_slice(rank: int, worker: int, num_workers: int, batches_per_rank: int, batch_size: int) -> tuple[int, int]:
    """Positions ``[start, stop)`` of an exact epoch's sample order that ``worker`` of ``rank`` reads.

    The rank's ``batches_per_rank × batch_size`` positions are contiguous, rank after rank, and split
    among its workers in proportion to the batches each makes: the slices of all ranks and workers
    tile ``[0, world × batches_per_rank × batch_size)`` once (see clip_pl/data/plan.py)."""
    before = sum(worker_batches(batches_per_rank, num_workers, v) for v in range(worker))
    start = (rank * batches_per_rank + before) * batch_size
    return start, start + worker_batches(batches_per_rank, num_workers, worker) * batch_size


def shuffle_buffer(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """Deterministic reservoir shuffle: the same input and rng give the same order (needed to resume)."""
    if size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class EpochPosition:
    """(epoch, batches of this epoch already consumed by the rank), shared with persistent workers.

    Workers are forked once (persistent_workers) and re-run ``__iter__`` every epoch; a shared-memory
    array is how the main process tells them which epoch that is and where a resume starts.
    """

    def __init__(self) -> None:
        self._values = RawArray("q", 2)

    def set(self, epoch: int, batches_consumed: int = 0) -> None:
        self._values[0], self._values[1] = int(epoch), int(batches_consumed)

    def get(self) -> tuple[int, int]:
        return int(self._values[0]), int(self._values[1])


class WebDatasetStream(IterableDataset):
    def __init__(
        self,
        shards: ShardSet,
        *,
        batch_size: int,
        batches_per_rank: int,
        rank: int,
        world_size: int,
        transform: Callable,
        tokenizer: Callable,
        image_size: int,
        resampled: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        epoch_samples: int | None = None,
        return_keys: bool = False,
        position: EpochPosition | None = None,
        decode_on: str = "cpu",
        resize_on: str | None = None,
    ) -> None:
        super().__init__()
        if not resampled and not shards.sizes_known:
            raise ValueError(
                "exact epochs need every shard's size (sizes.json); missing for "
                f"{shards.missing_sizes()[:3]} … Set data.sizes_file, or use data.resampled=true."
            )
        self.shards = shards
        self.batch_size = batch_size
        self.batches_per_rank = batches_per_rank
        self.rank, self.world_size = rank, world_size
        self.transform = transform if isinstance(transform, BatchedImageTransform) else BatchedImageTransform(transform)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.resampled, self.shuffle, self.seed = resampled, shuffle, seed
        self.shuffle_buffer_size = shuffle_buffer if shuffle else 0
        self.max_image_pixels = max_image_pixels
        self.epoch_samples = epoch_samples
        self.return_keys = return_keys
        self.position = position or EpochPosition()
        # "device": ship JPEG bytes + crop boxes, decoded after the transfer (clip_pl/data/device_decode.py).
        self.on_device = decode_on == "device"
        if self.on_device and self.transform.random_crop is None:
            raise ValueError(
                "data.decode_on=device runs training's RandomResizedCrop on the device; this "
                "loader's transform is something else (validation decodes on the CPU)."
            )
        # "device" with the CPU decode: ship the crops, resized on the device (clip_pl/data/device_resize.py).
        self.resize_on_device = resize_on == "device" and not self.on_device
        if self.resize_on_device and self.transform.random_crop is None:
            raise ValueError(
                "data.resize_on=device resizes training's RandomResizedCrop crops on the device; this "
                "loader's transform is something else (validation resizes in the workers)."
            )

    def __len__(self) -> int:
        return self.batches_per_rank

    # ---- iteration -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, consumed = self.position.get()
        # The DataLoader restarts its round-robin at worker 0; after a resume at batch k, batch k must
        # come from the worker that would have made it, so worker ids rotate by k.
        worker = (physical + consumed) % num_workers
        to_make = worker_batches(self.batches_per_rank, num_workers, worker)
        to_skip = min(to_make, worker_batches_consumed(consumed, num_workers, worker))
        ctx = _Context(epoch=epoch, worker=worker, num_workers=num_workers, consumed=consumed)
        if self.resampled:
            yield from self._resampled(ctx, to_make - to_skip)
        else:
            yield from self._exact(ctx, to_make, to_skip)

    def _exact(self, ctx: _Context, to_make: int, to_skip: int) -> Iterator[dict[str, Any]]:
        if to_skip >= to_make:
            return  # resumed after this worker's last batch of the epoch: nothing to read
        order = self.epoch_order(ctx.epoch)
        b = self.batch_size
        start, stop = worker_slice(self.rank, ctx.worker, ctx.num_workers, self.batches_per_rank, b)
        counts: Counter = Counter()
        rng = random.Random(derive_seed(self.seed, ctx.epoch, self.rank, ctx.worker, 1))
        raw = shuffle_buffer(read_positions(order, start, stop, counts), self.shuffle_buffer_size, rng)
        raw = iter(raw)
        # Resume: replay the same deterministic order without decoding what was already trained on.
        for _ in islice(raw, to_skip * b):
            pass
        counts.clear()
        fillers = _Fillers(self, order, start, stop, self._epoch_length())
        reservoir: list[tuple] = []
        rows = _Rows(self)
        for index in range(to_skip, to_make):
            chunk = list(islice(raw, b))
            if len(chunk) != b:  # cannot happen with a consistent manifest; fail loudly, never hang
                raise RuntimeError(
                    f"rank {self.rank} worker {ctx.worker}: slice ended after {len(chunk)} "
                    f"of {b} samples; sizes.json disagrees with the shards."
                )
            rows.start()
            with ctx.augmentation_rng(self.seed, self.rank, index):  # never across the yield
                good = [rows.add(d) for d in (self._decode(item, counts) for item in chunk) if d is not None]
                originals = list(good)
                while len(good) < b:
                    # A duplicate from the previous batch is harmless; within the batch it would be a false negative.
                    good.append(rows.add(reservoir.pop() if reservoir else fillers.next()))
                    counts["refilled"] += 1
                spares = self._spares(reservoir, fillers.next) if self.on_device else None
            reservoir = originals
            yield self._collate(good, counts, ctx.epoch, spares, rows.result(), originals=len(originals))

    def _resampled(self, ctx: _Context, to_make: int) -> Iterator[dict[str, Any]]:
        counts: Counter = Counter()
        rng = random.Random(derive_seed(self.seed, ctx.epoch, self.rank, ctx.worker, ctx.consumed, 2))
        raw = iter(shuffle_buffer(self._draw_shards(rng, counts), self.shuffle_buffer_size, rng))
        bad_in_a_row = 0
        previous: list[tuple] = []
        rows = _Rows(self)
        for index in range(to_make):
            batch: list[tuple] = []
            rows.start()
            with ctx.augmentation_rng(self.seed, self.rank, index, ctx.consumed):  # resumed: new crops too
                while len(batch) < self.batch_size:
                    decoded = self._decode(next(raw), counts)
                    if decoded is None:
                        bad_in_a_row += 1
                        if bad_in_a_row > MAX_CONSECUTIVE_BAD:
                            raise RuntimeError(
                                f"{bad_in_a_row} unusable samples in a row ({dict(counts)}); "
                                "check the shards and data.train_shards."
                            )
                        continue
                    bad_in_a_row = 0
                    batch.append(rows.add(decoded))
                spares = None
                if self.on_device:  # the previous batch's samples; for the first, a few more draws
                    spares = self._spares(previous, lambda: self._next_good(raw, Counter()))
            previous = batch
            yield self._collate(batch, counts, ctx.epoch, spares, rows.result())

    def _draw_shards(self, rng: random.Random, counts: Counter) -> Iterator[dict | Missing]:
        shards = self.shards.shards
        per_source = Counter(s.source for s in shards)
        weights = [self.shards.weights[s.source] / per_source[s.source] for s in shards]
        empty_in_a_row = 0
        while True:
            shard = rng.choices(shards, weights=weights)[0]
            produced = 0
            for item in read_shard(shard.url, None, counts):
                produced += 1
                yield item
            empty_in_a_row = 0 if produced else empty_in_a_row + 1
            if empty_in_a_row > max(20, 2 * len(shards)):
                raise RuntimeError(
                    f"{empty_in_a_row} shards in a row gave no sample (last: {shard.url}); "
                    "check data.train_shards, the pipe: command and its credentials."
                )

    # ---- helpers ---------------------------------------------------------------------------
    def _spares(self, previous: list[tuple], more: Callable[[], tuple]) -> list[tuple]:
        """Good samples for rows whose JPEG fails only on the device: the worker's previous batch (a
        duplicate across batches is harmless), else ``more()`` (drawn last, so the batch's crops match the CPU path)."""
        if previous:
            return previous[: device_decode.SPARES]
        spares = []
        try:
            for _ in range(device_decode.SPARES):
                spares.append(more())
        except RuntimeError:  # no good sample elsewhere: the batch goes with fewer spares
            pass
        return spares

    def _next_good(self, raw: Iterator, scratch: Counter) -> tuple:
        for _ in range(MAX_CONSECUTIVE_BAD):
            decoded = self._decode(next(raw), scratch)
            if decoded is not None:
                return decoded
        raise RuntimeError("no good sample for the device path's spares")

    def _epoch_length(self) -> int:
        total = self.shards.total_samples or 0
        return min(total, self.epoch_samples) if self.epoch_samples else total

    def epoch_order(self, epoch: int) -> list[Shard]:
        order = list(self.shards.shards)
        if self.shuffle:
            random.Random(derive_seed(self.seed, epoch, 0)).shuffle(order)
        return order

    def _decode(self, item: dict | Missing, counts: Counter) -> tuple | None:
        if isinstance(item, Missing):
            counts[f"skipped/{item.reason}"] += 1
            return None
        try:
            caption = decode_caption(item)  # cheap checks first: no image decode for a bad caption
            if self.on_device:
                tensor = device_decode.prepare(item, self.transform, self.image_size, counts, self.max_image_pixels)
            else:
                pixels = decode_pixels(item, self.image_size, counts, self.max_image_pixels)
                try:
                    if self.resize_on_device:
                        tensor = device_resize.crop(pixels, self.transform.random_crop)
                    else:
                        tensor = self.transform.per_image(pixels)
                except Exception as e:
                    raise BadSample("corrupt_image", f"transform failed: {e}") from None
        except BadSample as e:
            counts[f"skipped/{e.reason}"] += 1
            return None
        return tensor, caption, item.get("__key__", "")

    def _collate(
        self,
        items: list[tuple],
        counts: Counter,
        epoch: int | None,
        spares: list[tuple] | None,
        images: dict[str, Any] | None,
        originals: int | None = None,
    ) -> dict[str, Any]:
        """The batch of ``items`` (image, caption, key). ``images``: their image fields, built as they were
        decoded (:class:`_Rows`); None on the device path, whose image fields are made here."""
        batch: dict[str, Any] = {
            "text": self.tokenizer([c for _, c, _ in items]),
            "bad_samples": dict(counts),  # observed since this worker's previous batch
        }
        if self.on_device:
            batch.update(device_decode.collate_images([t for t, _, _ in items], self.image_size))
            # Rows after the originals are refills, already counted: a failure there is no new bad sample.
            batch["jpeg_refill"] = torch.arange(len(items)) >= (len(items) if originals is None else originals)
            batch.update(device_decode.collate_spares(spares or [], self.tokenizer, self.image_size))
        else:
            batch.update(images)
        if self.return_keys:
            batch["key"] = [k for _, _, k in items]
            batch["epoch"] = epoch  # the epoch whose sample order this batch comes from
        counts.clear()
        return batch


class _Rows:
    """The images of the batch being made, copied into it one by one as they are decoded
    (clip_pl/data/batch_rows.py says why); nothing on the device path, whose rows are JPEG bytes."""

    def __init__(self, stream: WebDatasetStream) -> None:
        self._stream, self._hint, self._rows = stream, (0, 0), None

    def start(self) -> None:
        stream = self._stream
        if stream.resize_on_device:
            self._rows = device_resize.CropCanvas(stream.batch_size, stream.image_size, self._hint)
        elif not stream.on_device:
            self._rows = StackedRows(stream.batch_size)

    def add(self, decoded: tuple) -> tuple:
        if self._rows is not None:
            self._rows.add(decoded[0])
        return decoded

    def result(self) -> dict[str, Any] | None:
        rows, self._rows = self._rows, None
        if isinstance(rows, device_resize.CropCanvas):
            self._hint = rows.next_hint()
            return rows.result()
        return None if rows is None else {"image": rows.result()}


class _Context:
    def __init__(self, epoch: int, worker: int, num_workers: int, consumed: int) -> None:
        self.epoch, self.worker, self.num_workers, self.consumed = epoch, worker, num_workers, consumed

    def augmentation_rng(self, seed: int, rank: int, *batch_id: int) -> contextlib.AbstractContextManager:
        """Random crops depend on (seed, epoch, rank, worker, batch) only, so a resumed epoch re-crops alike.
        They come from a ``random.Random`` of the batch's own (batch_transform.crop_randomness): torch's
        global RNG, the training process's own with num_workers=0, is never touched."""
        return crop_randomness(random.Random(derive_seed(seed, self.epoch, rank, self.worker, *batch_id, 3)))


def read_positions(order: list[Shard], start: int, stop: int, counts: Counter | None) -> Iterator[dict | Missing]:
    """Raw items at positions ``[start, stop)`` of the concatenation of ``order``'s shards."""
    offset = 0
    for shard in order:
        size = int(shard.size or 0)
        lo, hi = max(start, offset), min(stop, offset + size)
        if lo < hi:
            # Only the slice that reads a shard's end counts the shard's surplus, so it is counted once.
            reads_end = counts is not None and offset + size <= stop
            items = read_shard(shard.url, size, counts if reads_end else None)
            yield from islice(items, lo - offset, hi - offset)
            if reads_end:
                for _ in items:  # samples beyond sizes.json (stale manifest): read_shard counts them, yields none
                    pass
        offset += size
        if offset >= stop:
            return


class _Fillers:
    """Good samples from outside a worker's slice, read only if a batch cannot be filled otherwise."""

    def __init__(self, stream: WebDatasetStream, order: list[Shard], start: int, stop: int, length: int) -> None:
        used = stream.world_size * stream.batches_per_rank * stream.batch_size
        # The epoch's left-over positions first: those samples are otherwise unused this epoch.
        self._stream, self._order = stream, order
        self._ranges = [(used, length), (stop, used), (0, start)]
        self._iter: Iterator | None = None

    def _generate(self) -> Iterator[tuple]:
        scratch: Counter = Counter()  # those samples belong to other slices, which count them
        for lo, hi in self._ranges:
            for item in read_positions(self._order, lo, hi, None):
                decoded = self._stream._decode(item, scratch)
                if decoded is not None:
                    yield decoded

    def next(self) -> tuple:
        if self._iter is None:
            self._iter = self._generate()
        try:
            return next(self._iter)
        except StopIteration:
            raise RuntimeError(
                "no decodable sample anywhere in the dataset to complete a batch; "
                "check the shards (every sample was skipped, see the bad_samples counts)."
            ) from None
