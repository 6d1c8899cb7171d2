"""Apply a torchvision ``Compose`` (from clip_pl.model.image_transforms) with the tensor part batched.

The geometric part (crop, resize) runs per image on PIL as given; ``ToTensor`` + ``Normalize``, which
cost a per-image float conversion and two passes, run once per batch on a uint8 stack instead.
Same numbers (to float rounding) as calling the Compose per image; any Compose that does not end in
ToTensor → Normalize is simply applied per image.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T


class BatchedImageTransform:
    def __init__(self, compose: Callable) -> None:
        self.compose = compose
        steps = list(getattr(compose, "transforms", []))
        names = [type(s).__name__ for s in steps]
        self.fast = (len(steps) >= 2 and isinstance(steps[-1], T.Normalize) and "ToTensor" in names[-2])
        if self.fast:
            # Images reach us already RGB (decode.to_rgb), so an RGB mode conversion would only copy them.
            self.pil_steps = [s for s in steps[:-2] if getattr(s, "mode", None) != "RGB"]
            mean = torch.tensor(steps[-1].mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(steps[-1].std, dtype=torch.float32).view(1, -1, 1, 1)
            self.scale, self.shift = 1.0 / (255.0 * std), mean / std

    def per_image(self, image: Image.Image):
        """Run in the worker per sample: a uint8 HWC array on the fast path, else the final tensor."""
        if not self.fast:
            return self.compose(image)
        for step in self.pil_steps:
            image = step(image)
        return np.asarray(image, dtype=np.uint8)

    def collate(self, items: Sequence) -> torch.Tensor:
        if not self.fast:
            return torch.stack(list(items))
        stacked = torch.from_numpy(np.stack(items))  # B×H×W×3 uint8
        out = torch.empty((stacked.shape[0], 3, stacked.shape[1], stacked.shape[2]), dtype=torch.float32)
        out.copy_(stacked.permute(0, 3, 1, 2))
        return out.mul_(self.scale).sub_(self.shift)
