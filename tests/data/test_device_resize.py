"""``data.resize_on=device``: workers decode and crop, the batch is resized after the transfer.

    python -m pytest tests/data/test_device_resize.py -q

Everything runs with device = CPU (the same code as on a GPU). Tolerance against the CPU path, which
resizes each image in its worker with torchvision's uint8 antialiased bicubic: at most 2 grey levels at
any pixel and 0.01 on average (measured: max 2, mean 0.003 on photographs and synthetic pictures; the
CPU path's weights are fixed-point, the device's float).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torchvision import transforms as T

from clip_pl.data import WebDatasetDataModule
from clip_pl.data.batch_transform import random_resized_box, resized_crop
from clip_pl.data.device_resize import collate_crops, crop, resize_batch, resize_crops
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
    reference = torch.stack([resized_crop(x, random_resized_box(x.shape[1], x.shape[2], step.scale, step.ratio), step)
                             for x in images])
    batch = collate_crops(crops, size)
    assert batch["crop"].dtype == torch.uint8 and batch["crop_size"].tolist() == [list(c.shape[1:]) for c in crops]
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
    args = dict(batch_size=4, num_workers=2, image_size=image_size, context_length=CONTEXT, seed=7,
                return_keys=True, shuffle_buffer=8, resize_on=resize_on)
    args.update(kw)
    dm = WebDatasetDataModule(str(shards), **args)
    dm.setup("fit")
    if resume is not None:
        dm.resume_from(0, resume)
    out = []
    for batch in dm.train_dataloader():
        if resize_on == "device":
            assert "image" not in batch and batch["crop"].dtype == torch.uint8
            batch = resize_batch(batch)  # what CLIPModule.on_after_batch_transfer does, here on the CPU
        out.append(batch)
    return out


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
    full = _batches(tmp_path, "device")
    resumed = _batches(tmp_path, "device", resume=3)
    assert len(full) == 8 and len(resumed) == 5
    for a, b in zip(full[3:], resumed):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])


def test_refused_before_start(tmp_path):
    with pytest.raises(ValueError, match="resize_on"):
        WebDatasetDataModule(str(tmp_path), resize_on="gpu")
    with pytest.raises(ValueError, match="resize_on"):
        WebDatasetDataModule(str(tmp_path), decode_on="device", resize_on="worker")
    from clip_pl.data.shardspec import resolve_shards
    from clip_pl.data.stream import WebDatasetStream
    from clip_pl.model import get_tokenizer, image_transforms

    write_shards(str(tmp_path), [4])
    with pytest.raises(ValueError, match="RandomResizedCrop"):
        WebDatasetStream(resolve_shards(str(tmp_path), None, None), batch_size=2, batches_per_rank=1, rank=0,
                         world_size=1, transform=image_transforms(32)[1], tokenizer=get_tokenizer(CONTEXT),
                         image_size=32, resize_on="device")


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

    dm = WebDatasetDataModule(str(tmp_path), batch_size=4, num_workers=0, image_size=16, context_length=8, seed=5,
                              shuffle_buffer=4, resize_on="device")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, callbacks=[Seen()])
    trainer.fit(module, datamodule=dm)
    assert shapes == [((4, 3, 16, 16), torch.float32, False)] * 4
    assert json.dumps(dm.resize_on) == '"device"'
