"""open_clip's train/eval ``Compose`` (clip_pl.model.image_transforms) run on uint8 tensors, per image.

The workers do only the geometry (crop, resize) and ship uint8 pixels: ``ToTensor`` + ``Normalize``
(a float32 copy, 4× the bytes) happen on the device after the transfer (``clip_pl.pixels.normalize``).

Why not PIL for the resize: Pillow's bicubic resize was ~40 % of a worker's time on 256-px JPEGs;
torchvision's antialiased bicubic on uint8 tensors computes the same filter ~4× faster on one core.
The results agree with PIL's to within a few grey levels at edges (stated and tested in
tests/data/test_batch_transform.py). The crop is a view, so only the cropped region is resampled
(crop before resize).

Random crops: :func:`random_resized_box` draws RandomResizedCrop's box with RandomResizedCrop's
distribution (area fraction uniform in ``scale``, log aspect uniform in ``ratio``, up to 10 tries, then
a central crop) in plain Python: torchvision's ``get_params`` makes a dozen small tensor ops per try and
cost as much as the JPEG decode's header parsing. The loader draws from a ``random.Random`` it seeds
per batch (:func:`crop_randomness`), so crops depend on (seed, epoch, rank, worker, batch) only and a
resume re-crops alike; even one ``torch.rand`` call per image cost 2 % of a worker's time on 256-px
shards. Outside the loader (tests, a user's script), boxes come from torch's global RNG.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

from clip_pl.data.decode import as_tensor
from clip_pl.pixels import MEAN, STD

# Steps that need no work here: images reach the transform RGB already (decode.to_rgb), and
# ToTensor + Normalize are clip_pl.pixels.normalize on the device.
_DEVICE_OR_NOOP = ("MaybeConvertMode", "_convert_to_rgb", "MaybeToTensor", "ToTensor", "Normalize")


_TRIES = 10  # as torchvision's RandomResizedCrop
_crop_random: random.Random | None = None  # the loader's, while a batch is made (crop_randomness)


@contextlib.contextmanager
def crop_randomness(rng: random.Random) -> Iterator[None]:
    """Crop boxes drawn inside come from ``rng`` (see the module doc)."""
    global _crop_random
    previous, _crop_random = _crop_random, rng
    try:
        yield
    finally:
        _crop_random = previous


def random_resized_box(
    height: int, width: int, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop box on a ``height × width`` image; see the module doc."""
    if _crop_random is not None:
        draw = _crop_random.random
    else:
        draw = iter(torch.rand(2 * _TRIES + 2, dtype=torch.float64).tolist()).__next__
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_TRIES):
        target = area * (scale[0] + (scale[1] - scale[0]) * draw())
        aspect = math.exp(log_lo + (log_hi - log_lo) * draw())
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(draw() * (height - h + 1)), height - h)
            left = min(int(draw() * (width - w + 1)), width - w)
            return top, left, h, w
    # No try fitted: the largest central crop whose aspect is within ``ratio``.
    aspect = width / height
    if aspect < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif aspect > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(x: torch.Tensor, box: Sequence[int], step: T.RandomResizedCrop) -> torch.Tensor:
    """``x[:, top:top+h, left:left+w]`` resized to the step's size (bicubic, antialiased), uint8 in and out."""
    top, left, height, width = (int(v) for v in box)
    return F.resized_crop(
        x, top, left, height, width, list(step.size), interpolation=step.interpolation, antialias=True
    )


def _name(step) -> str:
    return getattr(step, "__name__", type(step).__name__)


class BatchedImageTransform:
    def __init__(self, compose: Callable) -> None:
        steps = list(getattr(compose, "transforms", [compose]))
        normalize = [s for s in steps if isinstance(s, T.Normalize)]
        if len(normalize) != 1 or not np.allclose(normalize[0].mean, MEAN) or not np.allclose(normalize[0].std, STD):
            raise ValueError(
                f"the image transform must end in Normalize with OpenAI's mean/std ({MEAN}, {STD}), "
                "which the model applies on the device (clip_pl.pixels); got "
                f"{[_name(s) for s in steps]}"
            )
        self.geometry = [s for s in steps if _name(s) not in _DEVICE_OR_NOOP]
        for step in self.geometry:
            if not isinstance(step, (T.RandomResizedCrop, T.Resize, T.CenterCrop)):
                raise ValueError(
                    f"unsupported image transform step {step!r}: the loader runs RandomResizedCrop, "
                    "Resize and CenterCrop on uint8 tensors (clip_pl/data/batch_transform.py)."
                )

    @property
    def random_crop(self) -> T.RandomResizedCrop | None:
        """The transform's one step when it is training's RandomResizedCrop alone (what the device path runs)."""
        only = self.geometry[0] if len(self.geometry) == 1 else None
        return only if isinstance(only, T.RandomResizedCrop) else None

    def pixels(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """One image (RGB PIL, or a uint8 3×H×W tensor) → uint8 3×h×w after the geometry steps."""
        x = as_tensor(image) if isinstance(image, Image.Image) else image
        for step in self.geometry:
            if isinstance(step, T.RandomResizedCrop):
                x = resized_crop(x, random_resized_box(x.shape[1], x.shape[2], step.scale, step.ratio), step)
            elif isinstance(step, T.Resize):
                x = F.resize(x, step.size, interpolation=step.interpolation, max_size=step.max_size, antialias=True)
            else:
                x = F.center_crop(x, list(step.size))
        return x

    per_image = pixels  # run in the worker per sample

    def collate(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 B×3×H×W, contiguous (what goes through shared memory and to the device)."""
        return torch.stack(list(items))
