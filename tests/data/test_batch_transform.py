"""The CPU loader's image path: uint8 geometry in the workers, normalisation on the device.

    python -m pytest tests/data/test_batch_transform.py -q

Stated tolerance (clip_pl/data/batch_transform.py, docs/data.md): against open_clip's own train and
eval Compose (PIL bicubic resize, ToTensor, Normalize) on the same crop box, the uint8 path plus
``clip_pl.pixels.normalize`` differs by at most 4 grey levels (of 255) at any pixel, by at most 0.1
level on average, and by more than 1 level at no more than 0.1 % of the pixels. Both round to uint8;
torchvision's and Pillow's bicubic differ only in rounding at sharp edges.
"""

from __future__ import annotations

import functools
import io

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from clip_pl.data.batch_transform import BatchedImageTransform, random_resized_box
from clip_pl.model import image_transforms
from clip_pl.pixels import MEAN, STD, normalize
from tests.support.fake_shards import jpeg_bytes, synthetic_image, write_shards

MAX_LEVELS, MEAN_LEVELS, FRACTION_ABOVE_ONE = 4.0, 0.1, 1e-3


def _images(sizes):
    # Through JPEG and back, as the loader sees them (decode.decode_image returns RGB PIL images).
    return [
        Image.open(io.BytesIO(jpeg_bytes(synthetic_image(i, w, h)))).convert("RGB") for i, (w, h) in enumerate(sizes)
    ]


@pytest.mark.parametrize(
    "image_size,sizes",
    [
        (224, [(256, 256), (300, 240), (240, 330), (520, 610), (800, 512), (230, 226)]),  # LAION-like and large
        (32, [(64, 96), (90, 70), (33, 40), (48, 48)]),  # the tests' small images
    ],
)
@pytest.mark.parametrize("which", ["train", "eval"])
def test_uint8_path_equals_open_clip_compose_within_tolerance(which, image_size, sizes, monkeypatch):
    compose = image_transforms(image_size)[which == "eval"]
    images = _images(sizes)
    batched = BatchedImageTransform(compose)
    torch.manual_seed(3)
    boxes = iter([random_resized_box(img.height, img.width, (0.9, 1.0), (3 / 4, 4 / 3)) for img in images])
    # open_clip's Compose itself (the old path: PIL, float32, normalised per image) on the boxes ours draws.
    monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(lambda img, scale, ratio: next(boxes)))
    reference = torch.stack([compose(img) for img in images])
    torch.manual_seed(3)  # the same seed draws the same crop boxes
    pixels = batched.collate([batched.pixels(img) for img in images])
    assert pixels.dtype == torch.uint8 and pixels.shape == (len(images), 3, image_size, image_size)
    assert pixels.is_contiguous()
    levels = (normalize(pixels) - reference).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255
    assert levels.max() <= MAX_LEVELS + 1e-3, f"max difference {levels.max():.2f} grey levels"
    assert levels.mean() <= MEAN_LEVELS, f"mean difference {levels.mean():.3f} grey levels"
    assert (levels > 1.001).float().mean() <= FRACTION_ABOVE_ONE


def test_random_boxes_follow_random_resized_crops_distribution():
    """The same law as torchvision's get_params: compare the box statistics of 3000 draws each."""
    for height, width in [(256, 256), (240, 330), (100, 400)]:  # the last never fits: central-crop fallback
        torch.manual_seed(0)
        ours = torch.tensor(
            [random_resized_box(height, width, (0.9, 1.0), (3 / 4, 4 / 3)) for _ in range(3000)], dtype=torch.float64
        )
        theirs = torch.tensor(
            [
                T.RandomResizedCrop.get_params(torch.empty(3, height, width), [0.9, 1.0], [3 / 4, 4 / 3])
                for _ in range(3000)
            ],
            dtype=torch.float64,
        )
        for name, column in (("top", 0), ("left", 1), ("height", 2), ("width", 3)):
            a, b = ours[:, column], theirs[:, column]
            assert abs(a.mean() - b.mean()) <= 0.5 + 0.1 * b.std(), (height, width, name, a.mean(), b.mean())
            assert abs(a.std() - b.std()) <= 0.5 + 0.1 * b.std(), (height, width, name, a.std(), b.std())
            for q in (0.01, 0.99):  # the tails (the sample's extremes themselves vary by a few pixels)
                assert abs(a.quantile(q) - b.quantile(q)) <= 1 + 0.1 * b.std(), (height, width, name, q)
        inside = (ours[:, 0] + ours[:, 2] <= height) & (ours[:, 1] + ours[:, 3] <= width)
        assert inside.all() and (ours[:, 2:] > 0).all()


def test_normalize_is_totensor_then_normalize():
    pixels = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    expected = T.Normalize(MEAN, STD)(pixels.float() / 255)
    assert torch.allclose(normalize(pixels), expected, atol=1e-5)
    with pytest.raises(TypeError, match="uint8"):
        normalize(pixels.float())


def test_refuses_a_transform_it_cannot_run():
    with pytest.raises(ValueError, match="unsupported image transform step"):
        BatchedImageTransform(T.Compose([T.ColorJitter(0.1), T.ToTensor(), T.Normalize(MEAN, STD)]))
    with pytest.raises(ValueError, match="mean/std"):
        BatchedImageTransform(T.Compose([T.CenterCrop(8), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)]))


# ---- the module normalises what the loader ships --------------------------------------------------

TINY = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=1, head_width=16),
    text_cfg=dict(context_length=8, vocab_size=49408, width=32, heads=2, layers=1),
)


def _module():
    from clip_pl.loss import ClipLoss
    from clip_pl.model import resolve_model_config
    from clip_pl.module import CLIPModule

    class Seen(CLIPModule):
        def training_step(self, batch, batch_idx):
            self.seen.append(batch["image"].detach().clone())
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    module = Seen(resolve_model_config(arch_config=TINY), ClipLoss(), functools.partial(torch.optim.SGD, lr=0.0))
    module.seen = []
    return module


@pytest.mark.parametrize("precision,dtype", [("32-true", torch.float32), ("bf16-true", torch.bfloat16)])
def test_training_step_sees_normalised_floats_of_the_uint8_batch(tmp_path, precision, dtype):
    import lightning as L

    from clip_pl.data import WebDatasetDataModule

    write_shards(str(tmp_path), [6, 6], image_px=(20, 40))

    def make():
        return WebDatasetDataModule(
            str(tmp_path), batch_size=4, num_workers=0, image_size=16, context_length=8, seed=5, shuffle_buffer=4
        )

    fresh = make()
    fresh.setup("fit")
    shipped = next(iter(fresh.train_dataloader()))["image"]  # batch 0 of epoch 0: what step 1 trains on
    assert shipped.dtype == torch.uint8 and shipped.shape == (4, 3, 16, 16)
    module = _module()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        precision=precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=make())
    seen = module.seen[0]
    assert seen.dtype == dtype
    assert torch.equal(seen, normalize(shipped).to(dtype))
