"""``data.resize_on=device``: workers decode and crop, the batch is resized after the transfer.

    python -m pytest tests/data/test_device_resize.py -q

Everything runs with device = CPU (the same code as on a GPU). Tolerance against the CPU path, which
resizes each image in its worker with torchvision's uint8 antialiased bicubic: at most 2 grey levels at
any pixel and 0.01 on average (measured: max 2, mean 0.003 on photographs and synthetic pictures; the
CPU path's weights are fixed-point, the device's float).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torchvision import transforms as T

from clip_pl.data.batch_transform import random_resized_box, resized_crop
from clip_pl.data.device_resize import collate_crops, crop, resize_batch, resize_crops
from tests.data.test_device_decode import _batches as decode_path_batches
from tests.data.test_device_decode import assert_resume_replays, fit_one_epoch
from tests.data.test_loader import _write_broken_corpus
from tests.support.fake_shards import write_shards

CONTEXT = 16
MAX_LEVELS, MEAN_LEVELS = 2, 0.01


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.int() - b.int()).abs()


def _photos() -> list[torch.Tensor]:
    from sklearn.datasets import load_sample_images

    return [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in load_sample_images().images]


@pytest.mark.parametrize("size", [224, 32])
def test_batched_resize_equals_torchvisions_per_image_resize_within_tolerance(size):
    """Photographs (sharp edges, where bicubic overshoots and the clip matters), crops of many shapes, up-
    and downscaling: the batched resample against the CPU path's resized_crop on the same boxes."""
    step = T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    images = [p[:, : 200 + 37 * i, : 180 + 51 * i] for i in range(4) for p in _photos()]
    images += [_photos()[0][:, :150, :130]]  # smaller than 224: an upscale
    torch.manual_seed(0)
    crops = [crop(x, step) for x in images]
    torch.manual_seed(0)
    reference = torch.stack(
        [resized_crop(x, random_resized_box(x.shape[1], x.shape[2], step.scale, step.ratio), step) for x in images]
    )
    batch = collate_crops(crops, size)
    assert batch["crop"].dtype == torch.uint8 and batch["crop_size"].tolist() == [list(c.shape[:2]) for c in crops]
    out = resize_batch({**batch, "text": torch.zeros(len(crops), 3)})
    assert set(out) == {"image", "text"}, "the crop fields are consumed"
    levels = _levels(out["image"], reference)
    assert levels.max() <= MAX_LEVELS and levels.float().mean() <= MEAN_LEVELS, (levels.max(), levels.float().mean())


def test_identity_and_padding_do_not_leak():
    """A crop already at the output size comes back unchanged, and whatever the canvas holds around a
    smaller crop never weighs in (the canvas is left uninitialised there): filled white, the crop still
    resizes exactly as it does alone."""
    photo = _photos()[1]
    exact = photo[:, :32, :32]
    small = photo[:, 40:70, 50:75]
    batch = collate_crops([exact, small, photo[:, :90, :120]], 32)
    canvas = batch["crop"]  # B×H×W×3
    canvas[:2, 32:] = 255
    canvas[:2, :, 32:] = 255
    canvas[1, 30:] = 255
    canvas[1, :, 25:] = 255
    out = resize_crops(canvas, batch["crop_size"], 32)
    assert torch.equal(out[0], exact)
    alone = collate_crops([small], 32)
    assert torch.equal(out[1], resize_crops(alone["crop"], alone["crop_size"], 32)[0])


def _batches(shards, resize_on, image_size=32, resume=None, **kw):
    return decode_path_batches(shards, "cpu", image_size, resume, resize_on=resize_on, **kw)


@pytest.mark.parametrize("image_px,image_size", [((24, 60), 32), ((200, 300), 64)])
def test_resize_on_device_gives_the_cpu_paths_batches(tmp_path, image_px, image_size):
    write_shards(str(tmp_path), [10, 9, 13], image_px=image_px)
    worker = _batches(tmp_path, None, image_size)
    device = _batches(tmp_path, "device", image_size)
    assert len(worker) == len(device) == 8
    for a, b in zip(worker, device):
        assert a["key"] == b["key"] and torch.equal(a["text"], b["text"]) and a["bad_samples"] == b["bad_samples"]
        assert b["image"].shape == (4, 3, image_size, image_size) and b["image"].dtype == torch.uint8
        levels = _levels(a["image"], b["image"])
        assert levels.max() <= MAX_LEVELS and levels.float().mean() <= MEAN_LEVELS


def test_bad_samples_counted_alike(tmp_path):
    _write_broken_corpus(tmp_path)  # every kind of bad sample the CPU path counts, broken tars included
    worker = _batches(tmp_path, "worker", max_image_pixels=4_000_000)
    device = _batches(tmp_path, "device", max_image_pixels=4_000_000)
    assert len(worker) == len(device) == 12
    for a, b in zip(worker, device):
        assert a["key"] == b["key"] and a["bad_samples"] == b["bad_samples"]
    total = Counter()
    for batch in device:
        total.update(batch["bad_samples"])
    assert total["skipped/corrupt_image"] > 0 and total["refilled"] > 0


def test_resume_mid_epoch(tmp_path):
    write_shards(str(tmp_path), [10, 9, 13], image_px=(24, 60))
    assert_resume_replays(tmp_path, batches=8, at=3, decode_on="cpu", resize_on="device")


def test_clip_module_trains_with_the_resize_on_device(tmp_path):
    """Through Lightning: the module resizes and normalises in on_after_batch_transfer."""
    import lightning as L

    from tests.data.test_batch_transform import _module

    write_shards(str(tmp_path), [8, 8], image_px=(20, 40))
    module = _module()
    shapes = []

    class Seen(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            shapes.append((tuple(batch["image"].shape), batch["image"].dtype, "crop" in batch))

    dm = fit_one_epoch(tmp_path, module, Seen(), resize_on="device")
    assert shapes == [((4, 3, 16, 16), torch.float32, False)] * 4
    assert dm.resize_on == "device"
