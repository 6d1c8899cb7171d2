"""Evaluation data, already split for this rank: every sample is seen by exactly one rank.

Sources:
  * an ImageFolder directory (``root/<class>/<image>``): rank r takes images r, r+W, r+2W …;
    class folders named ``0``, ``1`` … ``N`` map to that integer (so ``10`` follows ``9``), any other
    names map to their sorted position (ImageNet's synset folders give the standard order);
  * WebDataset shards, in the training grammar (``clip_pl.data.shardspec``): a directory of ``.tar``
    (with or without ``sizes.json``), a brace pattern, a glob, a ``pipe:`` command, a list, sources
    joined with ``::`` (one set: evaluation has no sampling weights). With at least as many shards as
    ranks, rank r reads shards r, r+W …; with fewer, every rank reads all shards and keeps the samples
    whose crc32(url, key) mod W is r. Labelled sets carry an integer ``.cls``; caption sets a ``.txt``.

Shards are read by training's reader (``clip_pl.data.reader``) and decoded by its rules
(``clip_pl.data.decode``): a sample that cannot be used is skipped and counted (``skipped/<reason>``,
also ``converted/<what>``), a shard that breaks is counted once; the loaders hand the counts along
with every batch (:func:`loader`).
"""

from __future__ import annotations

import os
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, default_collate, get_worker_info
from torchvision.datasets import ImageFolder

from clip_pl.data.decode import BadSample, decode_image, decode_text
from clip_pl.data.reader import read_shard
from clip_pl.data.shardspec import resolve_shards

_SPEC_CHARS = ("{", "*", "?", "[", "::", "pipe:", "://")
POSITIONS_PER_SHARD = 1 << 32  # a sample's position: shard number × this + its place in the shard


# --------------------------------------------------------------------------- locating the data


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """The shard URLs of a spec (training's grammar); local files must exist."""
    return [shard.url for shard in resolve_shards(spec, setting="evaluation data").shards]


def is_imagefolder(data: str | Sequence[str]) -> bool:
    """A directory with class sub-directories (and no .tar shards) is an ImageFolder."""
    if not isinstance(data, (str, Path)):
        return False
    path = Path(data)
    if not path.is_dir():
        if not any(mark in str(data) for mark in _SPEC_CHARS) and not str(data).endswith(".tar"):
            raise FileNotFoundError(
                f"evaluation data {str(data)!r} is neither a directory nor a .tar shard "
                f"pattern (check the path; ImageFolder: root/<class>/<image>)."
            )
        return False
    return not any(path.glob("*.tar"))


# --------------------------------------------------------------------------- ImageFolder


class ClassIndexImageFolder(ImageFolder):
    """ImageFolder whose all-integer folder names are the class indices themselves, and whose images are
    decoded by training's rules (``clip_pl.data.decode``): an image that cannot be used (corrupt,
    truncated, a decompression bomb, unreadable) is a :class:`Skipped` item, counted like a bad shard
    sample, instead of an exception that ends the evaluation."""

    def __getitem__(self, index: int) -> tuple[Any, int] | Skipped:
        path, target = self.samples[index]
        try:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise BadSample("unreadable_file", f"{path}: {e}") from None
            image = _image({"jpg": data}, self.transform or (lambda x: x), Counter())
        except BadSample as e:
            return Skipped(f"skipped/{e.reason}")
        return image, self.target_transform(target) if self.target_transform else target

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
        if not classes:
            raise FileNotFoundError(f"ImageFolder {str(directory)!r} has no class sub-directories.")
        if all(name.isdigit() for name in classes):
            classes.sort(key=int)
            return classes, {name: int(name) for name in classes}
        return classes, {name: i for i, name in enumerate(classes)}


def imagefolder_for_rank(
    root: str | Path, transform: Callable, num_classes: int | None, rank: int, world_size: int
) -> Dataset:
    dataset = ClassIndexImageFolder(str(root), transform=transform, allow_empty=True)
    numeric = all(name.isdigit() for name in dataset.classes)
    highest = max(dataset.class_to_idx.values())
    if num_classes is not None and (
        (numeric and highest >= num_classes) or (not numeric and len(dataset.classes) != num_classes)
    ):
        raise ValueError(
            f"ImageFolder {str(root)!r} has class folders {dataset.classes[:5]}… "
            f"({len(dataset.classes)} of them, largest index {highest}) but {num_classes} class names were "
            f"given; the class-name list must have one line per class folder (line k = class k)."
        )
    if len(dataset) == 0:
        raise FileNotFoundError(f"ImageFolder {str(root)!r} contains no images.")
    return Subset(dataset, range(rank, len(dataset), world_size))


# --------------------------------------------------------------------------- WebDataset


@dataclass(frozen=True)
class Skipped:
    """Stands in a batch for ``count`` samples that could not be used, and why."""

    reason: str
    count: int = 1


class _KeepSamplesOfRank:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def __call__(self, sample: dict) -> bool:
        key = f"{sample.get('__url__', '')}\0{sample['__key__']}".encode()
        return zlib.crc32(key) % self.world_size == self.rank


class ShardSamples(IterableDataset):
    """This rank's samples of ``urls``, each turned into a training-free item by ``sample_fn``.

    DataLoader workers split the rank's shards between them. A sample ``sample_fn`` refuses with
    :class:`BadSample` becomes a :class:`Skipped` marker; a broken shard (counted by the reader) too,
    on one rank only when every rank reads it.
    """

    def __init__(
        self,
        urls: Sequence[str],
        sample_fn: Callable[[dict, Counter], Any],
        rank: int,
        world_size: int,
        with_position: bool = False,
    ):
        self.urls, self.sample_fn = list(urls), sample_fn
        self.keep: _KeepSamplesOfRank | None = None
        self.owned = list(range(len(self.urls)))  # shards whose read errors this rank counts
        # with_position: each item ends with its place in the whole set (shard, then sample within the
        # shard), so results gathered from any number of ranks and workers can be put back in one order.
        self.with_position = with_position
        self.shard_number = list(range(len(self.urls)))
        if world_size > 1 and len(self.urls) >= world_size:
            self.shard_number = self.shard_number[rank::world_size]
            self.urls, self.owned = self.urls[rank::world_size], list(range(len(self.urls[rank::world_size])))
        elif world_size > 1:
            self.keep = _KeepSamplesOfRank(rank, world_size)
            self.owned = [i for i in range(len(self.urls)) if i % world_size == rank]

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in range(worker, len(self.urls), workers):
            events: Counter = Counter()
            for position, raw in enumerate(read_shard(self.urls[index], None, events)):
                if self.keep is not None and not self.keep(raw):
                    continue
                counts: Counter = Counter()
                try:
                    item = self.sample_fn(raw, counts)
                except BadSample as e:
                    counts[f"skipped/{e.reason}"] += 1
                    item = None
                yield from (Skipped(reason, n) for reason, n in counts.items())
                if item is not None:
                    yield (
                        (*item, self.shard_number[index] * POSITIONS_PER_SHARD + position)
                        if self.with_position
                        else item
                    )
            if index in self.owned:
                yield from (Skipped(reason, n) for reason, n in events.items())


def _image(sample: dict, transform: Callable, counts: Counter) -> torch.Tensor:
    image = decode_image(sample, None, counts)
    try:
        return transform(image)
    except Exception as e:
        raise BadSample("corrupt_image", f"transform failed: {e}") from None


class _LabelledSample:
    def __init__(self, transform: Callable, label_key: str):
        self.transform, self.label_key = transform, label_key

    def __call__(self, sample: dict, counts: Counter) -> tuple[torch.Tensor, int]:
        if self.label_key not in sample:
            raise ValueError(
                f"sample {sample['__key__']!r} in {sample.get('__url__')!r} has no "
                f"{self.label_key!r} label; set label_key to the extension holding the class index."
            )
        try:
            label = int(decode_text(sample, self.label_key))
        except ValueError:
            raise BadSample("bad_label", repr(sample[self.label_key][:20])) from None
        return _image(sample, self.transform, counts), label


class _CaptionedSample:
    def __init__(self, transform: Callable, tokenizer: Callable, text_key: str, separator: str | None):
        self.transform, self.tokenizer = transform, tokenizer
        self.text_key, self.separator = text_key, separator

    def __call__(self, sample: dict, counts: Counter) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_key not in sample:
            raise ValueError(
                f"sample {sample['__key__']!r} in {sample.get('__url__')!r} has no "
                f"{self.text_key!r} caption; set text_key."
            )
        text = decode_text(sample, self.text_key)  # empty: the image is a gallery item only
        captions = text.split(self.separator) if self.separator else [text]
        captions = [c.strip() for c in captions if c.strip()]
        image = _image(sample, self.transform, counts)
        tokens = (
            self.tokenizer(captions) if captions else torch.zeros((0, self.tokenizer.context_length), dtype=torch.long)
        )
        return image, tokens


def labelled_webdataset(
    shards: list[str], transform: Callable, label_key: str, rank: int, world_size: int, with_position: bool = False
) -> IterableDataset:
    return ShardSamples(shards, _LabelledSample(transform, label_key), rank, world_size, with_position)


class _WithPosition(Dataset):
    """(image, label, index in the whole ImageFolder) for rank ``rank``'s images r, r+W, r+2W …"""

    def __init__(self, subset: Subset):
        self.subset = subset

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, i: int):
        item = self.subset[i]
        return item if isinstance(item, Skipped) else (*item, self.subset.indices[i])


def labelled_for_rank(
    data: str | Sequence[str],
    transform: Callable,
    num_classes: int | None,
    label_key: str,
    rank: int,
    world_size: int,
    with_position: bool = False,
) -> Dataset | IterableDataset:
    """This rank's (image, label[, position]) items of an ImageFolder or labelled shards. ``num_classes``
    None: the folders need no class names (a linear probe learns from the labels alone)."""
    if is_imagefolder(data):
        subset = imagefolder_for_rank(data, transform, num_classes, rank, world_size)
        return _WithPosition(subset) if with_position else subset
    return labelled_webdataset(expand_shards(data), transform, label_key, rank, world_size, with_position)


def captioned_webdataset(
    shards: list[str],
    transform: Callable,
    tokenizer: Callable,
    text_key: str,
    separator: str | None,
    rank: int,
    world_size: int,
) -> IterableDataset:
    return ShardSamples(shards, _CaptionedSample(transform, tokenizer, text_key, separator), rank, world_size)


def collate_captioned(
    batch: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, all captions' tokens, index of each caption's image within the batch)."""
    images = torch.stack([image for image, _ in batch])
    tokens = torch.cat([t for _, t in batch])
    owners = torch.cat([torch.full((len(t),), i, dtype=torch.long) for i, (_, t) in enumerate(batch)])
    return images, tokens, owners


class _CountingCollate:
    """(the good items collated, or None when there are none; {reason: count} of the Skipped ones)."""

    def __init__(self, collate: Callable):
        self.collate = collate

    def __call__(self, items: list) -> tuple[Any, dict[str, int]]:
        counts: Counter = Counter()
        good = []
        for item in items:
            if isinstance(item, Skipped):
                counts[item.reason] += item.count
            else:
                good.append(item)
        return (self.collate(good) if good else None), dict(counts)


def loader(dataset: Any, batch_size: int, num_workers: int, collate_fn: Callable | None = None) -> DataLoader:
    """Batches as ``(batch or None, {reason: count})``: the batch's skipped / converted samples ride along."""
    if batch_size <= 0:
        raise ValueError(f"evaluation batch_size={batch_size} must be positive.")
    # Workers start from a forkserver and ignore SIGUSR1/SIGTERM: evaluation runs inside training (clip_pl/data/workers.py).
    from clip_pl.data.workers import worker_options

    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=False,
        collate_fn=_CountingCollate(collate_fn or default_collate),
        drop_last=False,
        **worker_options(num_workers),
    )
