"""uint8 pixels → the floats the image tower takes: the project's one image normalisation.

Loaders ship images as uint8 ``B×3×H×W`` (a quarter of float32's bytes through the workers' shared
memory and the host-to-device copy); ``CLIPModule.on_after_batch_transfer`` calls :func:`normalize`
on the device, so the cast and the two passes over every pixel run there, not in the workers.
The mean/std are open_clip's OpenAI constants, which ``clip_pl.model.image_transforms`` uses.
"""

from __future__ import annotations

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

MEAN: tuple[float, float, float] = tuple(OPENAI_DATASET_MEAN)  # type: ignore[assignment]
STD: tuple[float, float, float] = tuple(OPENAI_DATASET_STD)  # type: ignore[assignment]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``B×3×H×W`` pixels (0–255) → float32 ``(x / 255 - mean) / std``, on the images' device."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise TypeError(f"normalize expects uint8 B×3×H×W pixels, got {images.dtype} {tuple(images.shape)}")
    # (x - 255·mean) / (255·std): one subtraction and one division over float32, same value as
    # ToTensor (x / 255) then Normalize within float rounding.
    mean = torch.tensor(MEAN, dtype=torch.float32, device=images.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(STD, dtype=torch.float32, device=images.device).view(1, 3, 1, 1) * 255.0
    return images.float().sub_(mean).div_(std)
