"""Evaluation data, already split for this rank: every sample is seen by exactly one rank.

Sources:
  * an ImageFolder directory (``root/<class>/<image>``): rank r takes images r, r+W, r+2W …;
    class folders named ``0``, ``1`` … ``N`` map to that integer (so ``10`` follows ``9``), any other
    names map to their sorted position (ImageNet's synset folders give the standard order);
  * WebDataset shards (a ``.tar``, a brace pattern ``dir/{00000..00009}.tar``, a list, or a
    directory of ``.tar`` files): with at least as many shards as ranks, rank r reads shards r,
    r+W …; with fewer, every rank reads all shards and keeps the samples whose
    crc32(url, key) mod W is r. Labelled sets carry an integer ``.cls``; caption sets a ``.txt``.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from torchvision.datasets import ImageFolder

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
_REMOTE = ("pipe:", "http://", "https://", "gs://", "s3://")


# --------------------------------------------------------------------------- locating the data


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard list from a pattern, a list or a directory; local files must exist."""
    if isinstance(spec, (str, Path)) and Path(spec).is_dir():
        shards = sorted(str(p) for p in Path(spec).glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"directory {str(spec)!r} holds no .tar shards.")
        return shards
    specs = [str(spec)] if isinstance(spec, (str, Path)) else [str(s) for s in spec]
    shards = [s for item in specs for s in braceexpand.braceexpand(item)]
    missing = [s for s in shards if not s.startswith(_REMOTE) and not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards do not exist, e.g. {missing[:3]}; "
                                f"check the path or brace range.")
    return shards


def is_imagefolder(data: str | Sequence[str]) -> bool:
    """A directory with class sub-directories (and no .tar shards) is an ImageFolder."""
    if not isinstance(data, (str, Path)):
        return False
    path = Path(data)
    if not path.is_dir():
        if not any(ch in str(data) for ch in "{") and not str(data).endswith(".tar"):
            raise FileNotFoundError(f"evaluation data {str(data)!r} is neither a directory nor a .tar shard "
                                    f"pattern (check the path; ImageFolder: root/<class>/<image>).")
        return False
    return not any(path.glob("*.tar"))


# --------------------------------------------------------------------------- ImageFolder


class ClassIndexImageFolder(ImageFolder):
    """ImageFolder whose all-integer folder names are the class indices themselves."""

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
        if not classes:
            raise FileNotFoundError(f"ImageFolder {str(directory)!r} has no class sub-directories.")
        if all(name.isdigit() for name in classes):
            classes.sort(key=int)
            return classes, {name: int(name) for name in classes}
        return classes, {name: i for i, name in enumerate(classes)}


def imagefolder_for_rank(root: str | Path, transform: Callable, num_classes: int, rank: int,
                         world_size: int) -> Dataset:
    dataset = ClassIndexImageFolder(str(root), transform=transform, allow_empty=True)
    numeric = all(name.isdigit() for name in dataset.classes)
    highest = max(dataset.class_to_idx.values())
    if (numeric and highest >= num_classes) or (not numeric and len(dataset.classes) != num_classes):
        raise ValueError(
            f"ImageFolder {str(root)!r} has class folders {dataset.classes[:5]}… "
            f"({len(dataset.classes)} of them, largest index {highest}) but {num_classes} class names were "
            f"given; the class-name list must have one line per class folder (line k = class k).")
    if len(dataset) == 0:
        raise FileNotFoundError(f"ImageFolder {str(root)!r} contains no images.")
    return Subset(dataset, range(rank, len(dataset), world_size))


# --------------------------------------------------------------------------- WebDataset


def _keep_all_shards(urls):
    # The rank split is done before the pipeline is built; workers still split via split_by_worker.
    yield from urls


class _KeepSamplesOfRank:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def __call__(self, sample: dict) -> bool:
        key = f"{sample.get('__url__', '')}\0{sample['__key__']}".encode()
        return zlib.crc32(key) % self.world_size == self.rank


def _image_of(sample: dict, transform: Callable) -> torch.Tensor:
    for key in IMAGE_KEYS:
        if key in sample:
            return transform(sample[key].convert("RGB"))
    raise ValueError(f"sample {sample['__key__']!r} in {sample.get('__url__')!r} has no image "
                     f"(looked for {', '.join(IMAGE_KEYS)}; found {sorted(k for k in sample if not k.startswith('__'))}).")


class _LabelledSample:
    def __init__(self, transform: Callable, label_key: str):
        self.transform, self.label_key = transform, label_key

    def __call__(self, sample: dict) -> tuple[torch.Tensor, int]:
        if self.label_key not in sample:
            raise ValueError(f"sample {sample['__key__']!r} in {sample.get('__url__')!r} has no "
                             f"{self.label_key!r} label; set label_key to the extension holding the class index.")
        return _image_of(sample, self.transform), int(sample[self.label_key])


class _CaptionedSample:
    def __init__(self, transform: Callable, tokenizer: Callable, text_key: str, separator: str | None):
        self.transform, self.tokenizer = transform, tokenizer
        self.text_key, self.separator = text_key, separator

    def __call__(self, sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_key not in sample:
            raise ValueError(f"sample {sample['__key__']!r} in {sample.get('__url__')!r} has no "
                             f"{self.text_key!r} caption; set text_key.")
        text = str(sample[self.text_key])
        captions = text.split(self.separator) if self.separator else [text]
        captions = [c.strip() for c in captions if c.strip()]
        tokens = self.tokenizer(captions) if captions else torch.zeros((0, self.tokenizer.context_length), dtype=torch.long)
        return _image_of(sample, self.transform), tokens


def webdataset_for_rank(shards: list[str], sample_fn: Callable, rank: int, world_size: int) -> IterableDataset:
    sample_filter = None
    if world_size > 1 and len(shards) >= world_size:
        shards = shards[rank::world_size]
    elif world_size > 1:
        sample_filter = _KeepSamplesOfRank(rank, world_size)
    dataset = wds.WebDataset(shards, shardshuffle=False, nodesplitter=_keep_all_shards, empty_check=False)
    if sample_filter is not None:
        dataset = dataset.select(sample_filter)
    return dataset.decode("pil").map(sample_fn)


def labelled_webdataset(shards: list[str], transform: Callable, label_key: str, rank: int,
                        world_size: int) -> IterableDataset:
    return webdataset_for_rank(shards, _LabelledSample(transform, label_key), rank, world_size)


def captioned_webdataset(shards: list[str], transform: Callable, tokenizer: Callable, text_key: str,
                         separator: str | None, rank: int, world_size: int) -> IterableDataset:
    return webdataset_for_rank(shards, _CaptionedSample(transform, tokenizer, text_key, separator), rank, world_size)


def collate_captioned(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, all captions' tokens, index of each caption's image within the batch)."""
    images = torch.stack([image for image, _ in batch])
    tokens = torch.cat([t for _, t in batch])
    owners = torch.cat([torch.full((len(t),), i, dtype=torch.long) for i, (_, t) in enumerate(batch)])
    return images, tokens, owners


def loader(dataset: Any, batch_size: int, num_workers: int, collate_fn: Callable | None = None) -> DataLoader:
    if batch_size <= 0:
        raise ValueError(f"evaluation batch_size={batch_size} must be positive.")
    from clip_pl.data.workers import WorkerInit  # workers ignore SIGUSR1/SIGTERM (evaluation runs inside training)

    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                      collate_fn=collate_fn, drop_last=False, worker_init_fn=WorkerInit() if num_workers else None)
