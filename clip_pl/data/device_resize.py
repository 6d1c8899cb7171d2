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

from typing import Any, Mapping, Sequence

import torch
from torchvision import transforms as T

from clip_pl.data.batch_transform import random_resized_box

_A = -0.5  # Keys' cubic as PIL (and torchvision's antialiased bicubic) define it


def crop(pixels: torch.Tensor, step: T.RandomResizedCrop) -> torch.Tensor:
    """The worker's share: uint8 3×H×W → the RandomResizedCrop box of it (a view), with the CPU path's draw."""
    top, left, height, width = random_resized_box(pixels.shape[1], pixels.shape[2], step.scale, step.ratio)
    return pixels[:, top: top + height, left: left + width]


def collate_crops(crops: Sequence[torch.Tensor], out_size: int) -> dict[str, Any]:
    """Crops (uint8 3×h×w views) → ``crop`` (uint8 B×Hmax×Wmax×3, each crop top-left, anything elsewhere),
    ``crop_size`` (B×2) and ``crop_out_size`` (the side every row is resized to)."""
    sizes = torch.tensor([tuple(c.shape[1:]) for c in crops], dtype=torch.long).reshape(len(crops), 2)
    height, width = (int(v) for v in sizes.max(0).values) if len(crops) else (0, 0)
    # Left uninitialised around each crop: resample_weights gives pixels outside a row's crop weight 0, and
    # a uint8 times 0 is 0 whatever it holds (zeroing a 256-px batch cost ~5 % of a worker's time).
    canvas = torch.empty((len(crops), height, width, 3), dtype=torch.uint8)
    for row, c in enumerate(crops):
        canvas[row, : c.shape[1], : c.shape[2]] = c.permute(1, 2, 0)
    return {"crop": canvas, "crop_size": sizes, "crop_out_size": out_size}


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
