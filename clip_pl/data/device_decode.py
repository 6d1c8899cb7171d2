"""``data.decode_on=device``: workers ship JPEG bytes, the training device decodes and crops them.

Worker side (:func:`prepare`, per sample): the JPEG's header is read, never its pixels. Everything
the CPU path would refuse from the header alone is refused the same way (missing image, decompression
bomb, unreadable header: ``skipped/<reason>``), a truncated file (no end-of-image marker) is refused
as ``corrupt_image``, and the crop box is drawn from the same torch RNG draw as the CPU path on the
same (draft-reduced) size, then scaled to the full-size image the device decodes. Images that are not
baseline RGB/grey JPEGs (PNG, WebP, CMYK JPEGs…) are decoded and cropped in the worker as on the CPU
path and ride along as ready pixels.

Device side (:func:`decode_batch`, from ``CLIPModule.on_after_batch_transfer``): one batched
``torchvision.io.decode_jpeg(..., device=...)`` call (per image only if the batch call fails, to find
the culprits), crop + bicubic resize on the device, uint8 rows written into ``batch["image"]``. A JPEG
that only the decoder finds broken never kills the step: it is counted ``skipped/corrupt_image`` and
its row is refilled (counted ``refilled``) from the batch's spares: good samples of the worker's
previous batch, or, for a worker's first batch, from outside its slice (the CPU path's own refill
sources). So every rank keeps ``batch_size`` rows and the contrastive all-gather keeps its shape.
A row that was already a worker's refill (a sample of the previous batch, whose failure was counted
there) is replaced without being counted again. More failures than spares repeat a good row of the
batch (also ``refilled``). The same code runs with device = CPU in the tests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from clip_pl.data.batch_transform import BatchedImageTransform, random_resized_box
from clip_pl.data.decode import (
    DEFAULT_MAX_IMAGE_PIXELS,
    BadSample,
    decode_image,
    draft_for,
    image_bytes,
    open_image,
    quick_jpeg,
)
from clip_pl.data.jpeg import draft_size, ends_complete

SPARES = 4  # good samples shipped with each batch for rows whose JPEG fails only on the device
_DEVICE_MODES = {"RGB": None, "L": "grayscale"}  # JPEG colour modes decode_jpeg(mode=RGB) converts alike


@dataclass
class Jpeg:
    """A JPEG left for the device: its bytes and the crop box (top, left, h, w) in full-size pixels."""

    data: bytes
    box: tuple[int, int, int, int]


def prepare(
    sample: Mapping[str, Any],
    transform: BatchedImageTransform,
    target_size: int,
    counts: Counter,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Jpeg | torch.Tensor:
    """The worker's share of one sample's image: a :class:`Jpeg`, or uint8 pixels when the device cannot
    decode it. Raises :class:`BadSample` exactly where the CPU path's header checks would."""
    step = transform.random_crop
    data = image_bytes(sample)
    header = quick_jpeg(data, max_pixels) if step is not None else None
    if header is not None:
        mode, full_width, full_height = header
        width, height = draft_size(full_width, full_height, target_size)
    else:  # anything the quick scan cannot vouch for: PIL's header parser decides, as on the CPU path
        img = open_image(data, max_pixels)
        if img.format != "JPEG" or img.mode not in _DEVICE_MODES or step is None:
            return transform.pixels(decode_image(sample, target_size, counts, max_pixels))
        mode, (full_width, full_height) = img.mode, img.size
        draft_for(img, target_size)
        width, height = img.size  # the size the CPU path would decode at and crop from
    if not ends_complete(data):
        # PIL refuses a truncated JPEG, libjpeg only warns and fills grey: refuse it here, as the CPU path does.
        raise BadSample("corrupt_image", "truncated JPEG (no end-of-image marker)")
    if _DEVICE_MODES[mode]:
        counts[f"converted/{_DEVICE_MODES[mode]}"] += 1
    top, left, h, w = random_resized_box(height, width, step.scale, step.ratio)
    sy, sx = full_height / height, full_width / width
    top, left = min(int(round(top * sy)), full_height - 1), min(int(round(left * sx)), full_width - 1)
    h, w = min(max(1, int(round(h * sy))), full_height - top), min(max(1, int(round(w * sx))), full_width - left)
    # bytes, not the tar reader's bytearray: the DataLoader's default_convert turns any other sequence into
    # a list of ints (a JPEG became 17 000 Python ints: 100 samples/s).
    return Jpeg(bytes(data), (top, left, h, w))


def collate_images(items: Sequence[Jpeg | torch.Tensor], size: int) -> dict[str, Any]:
    """The batch's image part: ``image`` holds only the rows decoded in the worker (uint8, their row numbers in
    ``image_rows``: no placeholder pixels are filled or copied to the device), ``jpeg`` the bytes or None per
    row (bytes are not tensors, so Lightning leaves them on the host, where decode_jpeg wants them) and
    ``jpeg_box`` each JPEG's crop box."""
    ready = [(row, item) for row, item in enumerate(items) if not isinstance(item, Jpeg)]
    image = torch.stack([item for _, item in ready]) if ready else torch.empty((0, 3, size, size), dtype=torch.uint8)
    return {
        "image": image,
        "image_rows": torch.tensor([row for row, _ in ready], dtype=torch.long),
        "jpeg": [item.data if isinstance(item, Jpeg) else None for item in items],
        "jpeg_box": torch.tensor(
            [item.box if isinstance(item, Jpeg) else (0, 0, 0, 0) for item in items], dtype=torch.long
        ).reshape(len(items), 4),
    }


def collate_spares(items: Sequence[tuple], tokenizer, size: int) -> dict[str, Any]:
    """(image item, caption, key) spares → the batch's ``spare_*`` fields (see collate_images)."""
    images = collate_images([i for i, _, _ in items], size)
    return {
        "spare_image": images["image"],
        "spare_image_rows": images["image_rows"],
        "spare_jpeg": images["jpeg"],
        "spare_box": images["jpeg_box"],
        "spare_text": tokenizer([c for _, c, _ in items]) if items else None,
        "spare_key": [k for _, _, k in items],
    }


def _decode_all(datas: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    if not tensors:
        return []
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except Exception:  # one bad image fails the whole call: decode one by one to find it
        out: list[torch.Tensor | None] = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except Exception:
                out.append(None)
        return out


def _crop(full: torch.Tensor, box: torch.Tensor, size: list[int]) -> torch.Tensor:
    # The CPU path's resize (bicubic, antialiased; clip_pl.data.batch_transform), on the device.
    top, left, height, width = box.tolist()
    return F.resized_crop(full, top, left, height, width, size, interpolation=InterpolationMode.BICUBIC, antialias=True)


def decode_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """Fill the JPEG rows of ``batch["image"]`` (already on its device) and refill the rows that fail."""
    ready, device = batch["image"], batch["image"].device
    size = list(ready.shape[-2:])
    image = torch.empty((len(batch["jpeg"]), 3, *size), dtype=torch.uint8, device=device)
    image[batch["image_rows"].to(device)] = ready
    rows = [i for i, d in enumerate(batch["jpeg"]) if d is not None]
    decoded = _decode_all([batch["jpeg"][i] for i in rows], device)
    bad = []
    for row, full in zip(rows, decoded):
        if full is None:
            bad.append(row)
        else:
            image[row] = _crop(full, batch["jpeg_box"][row], size)
    out = {k: v for k, v in batch.items() if not k.startswith(("jpeg", "spare_", "image_rows"))}
    out["image"] = image
    if not bad:
        return out
    counts = Counter(batch.get("bad_samples") or {})
    text = batch["text"].clone()
    keys = list(batch["key"]) if batch.get("key") is not None else None
    spares = iter(range(len(batch.get("spare_jpeg") or [])))
    good = [r for r in range(image.shape[0]) if r not in bad]
    refill_rows = batch.get("jpeg_refill")
    for n, row in enumerate(bad):
        if refill_rows is None or not bool(refill_rows[row]):
            # A refill row holds a sample of the previous batch whose failure was counted there; its new
            # content is still the one refill the worker counted.
            counts["skipped/corrupt_image"] += 1
            counts["refilled"] += 1
        source = _next_spare(batch, spares, size, image, row)
        if source is not None:
            text[row] = batch["spare_text"][source]
            if keys is not None:
                keys[row] = batch["spare_key"][source]
            continue
        if not good:
            raise RuntimeError(
                "every JPEG of the batch and its spares failed to decode on the device; "
                "check the shards (e.g. with data.decode_on=cpu, which names each bad sample)."
            )
        donor = good[n % len(good)]  # a duplicate within the batch: rare, counted as a refill
        image[row], text[row] = image[donor], text[donor]
        if keys is not None:
            keys[row] = keys[donor]
    out.update(image=image, text=text, bad_samples=dict(counts))
    if keys is not None:
        out["key"] = keys
    return out


def _next_spare(batch, spares, size, image, row) -> int | None:
    for index in spares:
        data = batch["spare_jpeg"][index]
        if data is None:  # a spare decoded in the worker: ready pixels
            image[row] = batch["spare_image"][batch["spare_image_rows"].tolist().index(index)]
            return index
        full = _decode_all([data], image.device)[0]
        if full is not None:
            image[row] = _crop(full, batch["spare_box"][index], size)
            return index
    return None
