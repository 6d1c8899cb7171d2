"""``data.resize_on=device``: workers decode and crop, the training device resizes the whole batch at once.

Why: on 256-px shards the worker's bicubic resize costs about as much as the JPEG decode, so a worker
that resizes cannot get near the decode's own rate (``benchmarks/loader_bench.py --per-core`` reports
this ceiling). Here the worker decodes exactly as the CPU path does (``decode.decode_pixels``, every bad
sample caught and counted there), draws the crop box with the same RNG draw (``batch_transform.
random_resized_box``), and ships the crop itself: each one copied into the top-left corner of a
uint8 canvas as large as the batch's largest crop, with its height and width. The canvas is
height × width × channel, the decoders' own memory order: copying a crop into a channel-first
canvas transposed it and cost 7× as much (about half the decode's time). No sample
can fail after the transfer, so batch counts, refills, exact epochs and resume are the CPU path's.

Device side (:func:`resize_batch`, from ``CLIPModule.on_after_batch_transfer``): one batched separable
resample for all rows. Each row gets its own weight matrices, built on the device from its crop size
with the filter PIL and torchvision use for antialiased bicubic (Keys' cubic, a = -0.5, widened by the
downscale factor; only the crop's own pixels weigh in, normalised per output pixel), and the batch is
two ``einsum`` calls instead of a kernel launch per image. The result agrees with the CPU path's
``resized_crop`` to within 2 grey levels at any pixel, 0.01 on average (their weights are fixed-point, these float;
``tests/data/test_device_resize.py``). Bytes through shared memory and to the device: the crops' size,
about 1.3× the 224-px output for 256-px shards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torchvision import transforms as T

from clip_pl.data.batch_rows import batch_tensor
from clip_pl.data.batch_transform import random_resized_box

_A = -0.5  # Keys' cubic as PIL (and torchvision's antialiased bicubic) define it


def crop(pixels: torch.Tensor, step: T.RandomResizedCrop) -> np.ndarray:
    """The worker's share: uint8 3×H×W → the RandomResizedCrop box of it, with the CPU path's draw, as an
    H×W×3 NumPy view (the decoders' memory order; a NumPy view and copy cost ~2 µs where torch's
    indexing took ~7, per sample)."""
    top, left, height, width = random_resized_box(pixels.shape[1], pixels.shape[2], step.scale, step.ratio)
    return pixels.permute(1, 2, 0).numpy()[top : top + height, left : left + width]


class CropCanvas:
    """The batch's crops → ``crop`` (uint8 B×H×W×3, each crop in its row's top-left corner, anything
    elsewhere), ``crop_size`` (B×2) and ``crop_out_size`` (the side every row is resized to).

    Each crop is copied in by :meth:`add` as soon as it is cut, while its pixels are in cache
    (clip_pl/data/batch_rows.py says why). The canvas starts as large as ``hint`` (the previous batch's
    :meth:`next_hint`) and grows, copying the rows it holds, when a crop does not fit. Sides are rounded
    up to a multiple of 32: shards of varied image sizes (img2dataset's keep_ratio) otherwise grew the
    canvas by a pixel or two a few times a batch, each time copying every row. Left uninitialised
    around each crop: resample_weights gives pixels outside a row's crop weight 0, and a uint8 times 0
    is 0 whatever it holds (zeroing a 256-px batch cost ~5 % of a worker's time)."""

    def __init__(self, rows: int, out_size: int, hint: tuple[int, int] = (0, 0)) -> None:
        self.rows, self.out_size = rows, out_size
        self.sizes: list[tuple[int, int]] = []
        self.canvas = batch_tensor((rows, *hint, 3), torch.uint8) if min(hint) > 0 else None
        self.pixels = self.canvas.numpy() if self.canvas is not None else None  # the same memory

    def add(self, crop: np.ndarray | torch.Tensor) -> None:
        """One crop: uint8 h×w×3 NumPy (what :func:`crop` gives) or 3×h×w tensor, any strides."""
        if isinstance(crop, torch.Tensor):
            crop = crop.permute(1, 2, 0).numpy()
        height, width = crop.shape[0], crop.shape[1]
        row = len(self.sizes)
        if row == self.rows:
            raise ValueError(f"a batch of {self.rows} crops got one more")
        canvas_height, canvas_width = self._canvas_size()
        if height > canvas_height or width > canvas_width:
            self._resize(_round_up(max(height, canvas_height)), _round_up(max(width, canvas_width)))
        self.pixels[row, :height, :width] = crop
        self.sizes.append((height, width))

    def _canvas_size(self) -> tuple[int, int]:
        return (self.canvas.shape[1], self.canvas.shape[2]) if self.canvas is not None else (0, 0)

    def _resize(self, height: int, width: int) -> None:
        canvas = batch_tensor((self.rows, height, width, 3), torch.uint8)
        pixels = canvas.numpy()
        for row, (h, w) in enumerate(self.sizes):
            pixels[row, :h, :w] = self.pixels[row, :h, :w]
        self.canvas, self.pixels = canvas, pixels

    def _largest(self) -> tuple[int, int]:
        return (max(h for h, _ in self.sizes), max(w for _, w in self.sizes)) if self.sizes else (0, 0)

    def next_hint(self) -> tuple[int, int]:
        """The canvas size for the next batch: this one's largest crop, sides rounded up."""
        height, width = self._largest()
        return _round_up(height), _round_up(width)

    def result(self) -> dict[str, Any]:
        if len(self.sizes) != self.rows:
            raise ValueError(f"a batch of {self.rows} crops got {len(self.sizes)}")
        height, width = self._largest()
        canvas_height, canvas_width = self._canvas_size()
        if height * width < 0.75 * canvas_height * canvas_width:
            self._resize(height, width)  # much smaller crops than the hint: don't ship the margin
        canvas = self.canvas if self.canvas is not None else torch.empty((0, 0, 0, 3), dtype=torch.uint8)
        sizes = torch.tensor(self.sizes, dtype=torch.long).reshape(len(self.sizes), 2)
        return {"crop": canvas, "crop_size": sizes, "crop_out_size": self.out_size}


def _round_up(side: int, multiple: int = 32) -> int:
    return -(-side // multiple) * multiple


def collate_crops(crops: Sequence[np.ndarray | torch.Tensor], out_size: int) -> dict[str, Any]:
    """:class:`CropCanvas` of ``crops`` all at once."""
    canvas = CropCanvas(len(crops), out_size)
    for c in crops:
        canvas.add(c)
    return canvas.result()


def _cubic(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    near = ((_A + 2) * x - (_A + 3)) * x * x + 1
    far = ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_weights(in_sizes: torch.Tensor, out_size: int, max_in: int) -> torch.Tensor:
    """B × out_size × max_in: row b maps ``in_sizes[b]`` input pixels onto ``out_size`` outputs, as PIL's
    antialiased bicubic does (support widened by the downscale factor, weights normalised per output)."""
    n = in_sizes.to(torch.float64)[:, None, None]
    scale = n / out_size
    widen = scale.clamp(min=1.0)  # antialias: a downscale low-passes over proportionally more inputs
    centre = scale * (torch.arange(out_size, dtype=torch.float64, device=in_sizes.device)[None, :, None] + 0.5)
    source = torch.arange(max_in, dtype=torch.float64, device=in_sizes.device)[None, None, :]
    weights = _cubic((source + 0.5 - centre) / widen) * (source < n)
    return weights / weights.sum(-1, keepdim=True)


def resize_crops(canvas: torch.Tensor, sizes: torch.Tensor, out_size: int) -> torch.Tensor:
    """uint8 B×Hmax×Wmax×3 crops (``sizes`` B×2) → uint8 B×3×out×out, in two batched matrix products."""
    sizes = sizes.to(canvas.device)
    rows = resample_weights(sizes[:, 0], out_size, canvas.shape[1]).to(torch.float32)
    cols = resample_weights(sizes[:, 1], out_size, canvas.shape[2]).to(torch.float32)
    # Horizontal pass first, rounded and clipped to uint8's range before the vertical one, as PIL and
    # torchvision do: bicubic overshoots at sharp edges, and the clip there is part of their result.
    pixels = torch.einsum("bhwc,btw->bhtc", canvas.to(torch.float32), cols).round_().clamp_(0, 255)
    pixels = torch.einsum("bsh,bhtc->bcst", rows, pixels)
    return pixels.round_().clamp_(0, 255).to(torch.uint8).contiguous()


def resize_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch with ``image`` (uint8 B×3×out×out) made from its ``crop`` fields, on the crops' device."""
    out = {k: v for k, v in batch.items() if not k.startswith("crop")}
    out["image"] = resize_crops(batch["crop"], batch["crop_size"], int(batch["crop_out_size"]))
    return out
