"""Small evaluation sets for the suite's tests, written to disk, and clip_benchmark's loaders over them.

Labelled images in an ImageFolder (numeric class folders), captioned images in WebDataset shards,
and the torch Datasets through which clip_benchmark's metric functions read the very same files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tests.support.eval import (
    CLASSNAMES,
    TEMPLATES,
    caption_samples,
    captions_for,
    random_images,
    write_imagefolder,
    write_shards,
)

# Ten captioned images, each with at least one caption (clip_benchmark counts a caption-less image as a miss).
RETRIEVAL_CAPTION_COUNTS = [2, 1, 1, 3, 1, 2, 1, 1, 2, 1, 1, 2]


def labelled_folder(root: Path, n: int = 45, seed: int = 11) -> Path:
    """Uneven classes (the last one three times as large), so mean per-class recall differs from accuracy."""
    images = random_images(n, seed=seed)
    return write_imagefolder(root, images, [min(i % (len(CLASSNAMES) + 2), len(CLASSNAMES) - 1) for i in range(n)])


def captioned_shards(
    root: Path, seed: int = 12, num_shards: int = 2
) -> tuple[list[str], list[Image.Image], list[list[str]]]:
    captions = captions_for(RETRIEVAL_CAPTION_COUNTS)
    images = random_images(len(captions), seed=seed)
    return write_shards(root, caption_samples(images, captions), num_shards), images, captions


def write_task_list(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def zeroshot_task_yaml(folder: str, name: str = "zs") -> str:
    return (
        f"  {name}:\n    type: zeroshot_classification\n    data: {folder}\n"
        f"    classnames: {list(CLASSNAMES)}\n    templates: {list(TEMPLATES)}\n"
    )


class CaptionedImages(Dataset):
    """(image tensor, [captions]) per image: the retrieval dataset layout clip_benchmark reads."""

    def __init__(self, images, captions, transform):
        self.images, self.captions, self.transform = images, captions, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self._decoded(i)), self.captions[i]

    def _decoded(self, i: int) -> Image.Image:
        # Through the same encoding as the shards (odd images JPEG), so both sides see the same pixels.
        import io

        buffer = io.BytesIO()
        fmt = "JPEG" if i % 2 else "PNG"
        self.images[i].save(buffer, format=fmt, quality=95)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def captioned_loader(images, captions, transform, batch_size: int = 4) -> DataLoader:
    return DataLoader(
        CaptionedImages(images, captions, transform),
        batch_size=batch_size,
        collate_fn=lambda batch: (torch.stack([b[0] for b in batch]), [b[1] for b in batch]),
    )
