"""``data.decode_on=device``: JPEG bytes from the workers, decoded and cropped after the transfer.

    python -m pytest tests/data/test_device_decode.py -q

Everything runs with device = CPU (the same code as on a GPU: torchvision.io.decode_jpeg(device=...)).
Equality with the CPU path: images no larger than twice the output size decode identically (the same
libjpeg, the same crop box, the same resize): 0 grey levels apart. Larger JPEGs, which the CPU path
decodes at a reduced DCT scale (draft mode) and the device at full size, agree within 2 grey levels
on average (interpolation tolerance: 0.3–1.1 measured on these noisy synthetic pictures; edges differ most).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from clip_pl.data import WebDatasetDataModule
from clip_pl.data.device_decode import SPARES, decode_batch
from clip_pl.data.device_resize import resize_batch
from tests.data.test_loader import _write_broken_corpus
from tests.support.fake_shards import jpeg_bytes, make_sample, synthetic_image, write_shard, write_shards

CONTEXT = 16


def device_only_failure(index: int) -> dict[str, bytes]:
    """A JPEG whose header PIL parses (so the worker ships it) but whose Huffman table no decoder accepts."""
    data = bytearray(jpeg_bytes(synthetic_image(index, 44, 40)))
    at = data.index(b"\xff\xc4")  # DHT marker: the 16 code counts after its length become impossible
    data[at + 5 : at + 21] = b"\xff" * 16
    return {"__key__": f"devbad{index}", "jpg": bytes(data), "txt": b"a picture the device cannot decode"}


def _batches(shards, decode_on, image_size=32, resume=None, **kw):
    """One epoch of 2-worker batches, each put through the device's share as CLIPModule.on_after_batch_transfer
    does (here on the CPU): decode_on=device's decode or resize_on=device's resize."""
    args = dict(
        batch_size=4,
        num_workers=2,
        image_size=image_size,
        context_length=CONTEXT,
        seed=7,
        return_keys=True,
        shuffle_buffer=8,
        decode_on=decode_on,
    )
    args.update(kw)
    dm = WebDatasetDataModule(str(shards), **args)
    dm.setup("fit")
    if resume is not None:
        dm.resume_from(0, resume)
    out = []
    for batch in dm.train_dataloader():
        if decode_on == "device":
            assert batch["image"].dtype == torch.uint8 and isinstance(batch["jpeg"], list)
            # bytes objects: the DataLoader converts any other sequence (a bytearray) element by element
            assert all(d is None or type(d) is bytes for d in batch["jpeg"] + (batch["spare_jpeg"] or []))
            batch = decode_batch(batch)
            assert "jpeg" not in batch and not any(k.startswith("spare_") for k in batch)
        elif kw.get("resize_on") == "device":
            assert "image" not in batch and batch["crop"].dtype == torch.uint8
            batch = resize_batch(batch)
        out.append(batch)
    return out


@pytest.mark.parametrize("image_px,image_size,mean_levels", [((24, 60), 32, 0.0), ((460, 600), 224, 2.0)])
def test_device_path_gives_the_cpu_paths_batches(tmp_path, image_px, image_size, mean_levels):
    write_shards(str(tmp_path), [10, 9, 13], image_px=image_px)
    cpu = _batches(tmp_path, "cpu", image_size)
    device = _batches(tmp_path, "device", image_size)
    assert len(cpu) == len(device) == 8
    for a, b in zip(cpu, device):
        assert a["key"] == b["key"] and torch.equal(a["text"], b["text"]) and a["bad_samples"] == b["bad_samples"]
        assert b["image"].shape == (4, 3, image_size, image_size) and b["image"].dtype == torch.uint8
        levels = (a["image"].float() - b["image"].float()).abs()
        assert levels.mean() <= mean_levels, f"{levels.mean():.3f} grey levels apart on average"


def _total(batches) -> Counter:
    total = Counter()
    for batch in batches:
        total.update(batch["bad_samples"])
    return total


def test_bad_samples_counted_alike_and_device_failures_refilled(tmp_path):
    _write_broken_corpus(tmp_path)  # every kind of bad sample the CPU path counts, broken tars included
    write_shard(
        str(tmp_path / "00005.tar"),
        [device_only_failure(i) for i in range(2)] + [make_sample(f"ok{i}", 300 + i) for i in range(6)],
    )
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    (tmp_path / "sizes.json").write_text(json.dumps({**sizes, "00005.tar": 8}))
    cpu = _batches(tmp_path, "cpu", max_image_pixels=4_000_000)
    device = _batches(tmp_path, "device", max_image_pixels=4_000_000)
    assert len(cpu) == len(device) == 14, "the same number of full batches"
    assert all(b["image"].shape[0] == 4 and len(b["key"]) == 4 for b in device)
    assert _total(device) == _total(cpu), "every reason counted the same, wherever the failure was found"
    assert _total(device)["skipped/corrupt_image"] == 4  # 2 found in the worker + 2 only by the decoder
    keys = [k for b in device for k in b["key"]]
    assert not any(k.startswith("devbad") for k in keys), "no undecodable sample reached a batch"
    for batch in device:
        assert len(set(batch["key"])) == 4, "a refill never duplicates a row of its own batch"
        assert batch["image"].flatten(1).float().std(dim=1).min() > 1, "every row holds a decoded picture"


def test_more_device_failures_than_spares_keep_the_batch_full():
    good = jpeg_bytes(synthetic_image(5, 40, 40))
    bad = device_only_failure(0)["jpg"]
    rows = [bad] * (SPARES + 2) + [good]
    n = len(rows)
    batch = {
        "image": torch.zeros(0, 3, 16, 16, dtype=torch.uint8),
        "image_rows": torch.zeros(0, dtype=torch.long),
        "jpeg": rows,
        "jpeg_box": torch.tensor([[0, 0, 40, 40]] * n),
        "text": torch.arange(n).unsqueeze(1),
        "key": [f"k{i}" for i in range(n)],
        "bad_samples": {"converted/grayscale": 1},
        "spare_jpeg": [bad, good],
        "spare_box": torch.tensor([[0, 0, 40, 40]] * 2),
        "spare_image": torch.zeros(0, 3, 16, 16, dtype=torch.uint8),
        "spare_image_rows": torch.zeros(0, dtype=torch.long),
        "spare_text": torch.tensor([[100], [101]]),
        "spare_key": ["s0", "s1"],
    }
    out = decode_batch(batch)
    assert out["bad_samples"] == {"converted/grayscale": 1, "skipped/corrupt_image": n - 1, "refilled": n - 1}
    assert out["key"][0] == "s1" and out["text"][0].item() == 101, "the first bad row takes the first good spare"
    assert out["key"][1:] == ["k6"] * (n - 1), "then good rows of the batch are repeated"
    assert torch.equal(out["image"][0], out["image"][-1]) and out["image"].float().std() > 1
    with pytest.raises(RuntimeError, match="every JPEG of the batch"):
        decode_batch({**batch, "jpeg": [bad] * n, "spare_jpeg": [bad]})


def test_resume_mid_epoch_on_the_device_path(tmp_path):
    write_shards(str(tmp_path), [10, 9, 13], image_px=(24, 60))
    write_shard(
        str(tmp_path / "00003.tar"),
        [device_only_failure(i) for i in range(2)] + [make_sample(f"late{i}", 500 + i) for i in range(2)],
    )
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    (tmp_path / "sizes.json").write_text(json.dumps({**sizes, "00003.tar": 4}))
    assert_resume_replays(tmp_path, batches=9, at=3, decode_on="device")


def assert_resume_replays(shards, batches: int, at: int, **settings) -> None:
    """Resumed at batch ``at``, the epoch's remaining batches are the uninterrupted run's, pixel for pixel."""
    full = _batches(shards, resume=None, **settings)
    resumed = _batches(shards, resume=at, **settings)
    assert len(full) == batches and len(resumed) == batches - at
    for a, b in zip(full[at:], resumed):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])


def test_unsupported_settings_are_refused_before_start(tmp_path):
    """Both device-side options (decode_on=device here, resize_on=device in test_device_resize.py)."""
    with pytest.raises(ValueError, match="decode_on"):
        WebDatasetDataModule(str(tmp_path), decode_on="gpu")
    with pytest.raises(ValueError, match="resize_on"):
        WebDatasetDataModule(str(tmp_path), resize_on="gpu")
    with pytest.raises(ValueError, match="resize_on"):
        WebDatasetDataModule(str(tmp_path), decode_on="device", resize_on="worker")
    from clip_pl.data.shardspec import resolve_shards
    from clip_pl.data.stream import WebDatasetStream
    from clip_pl.model import get_tokenizer, image_transforms

    write_shards(str(tmp_path), [4])
    for setting in ({"decode_on": "device"}, {"resize_on": "device"}):
        with pytest.raises(ValueError, match="RandomResizedCrop"):
            WebDatasetStream(
                resolve_shards(str(tmp_path), None, None),
                batch_size=2,
                batches_per_rank=1,
                rank=0,
                world_size=1,
                transform=image_transforms(32)[1],
                tokenizer=get_tokenizer(CONTEXT),
                image_size=32,
                **setting,
            )


def test_clip_module_trains_on_the_device_path(tmp_path):
    """Through Lightning: the module decodes, refills and normalises in on_after_batch_transfer."""
    import lightning as L

    from tests.data.test_batch_transform import _module

    write_shards(str(tmp_path), [6], image_px=(20, 40))
    write_shard(
        str(tmp_path / "00001.tar"), [device_only_failure(0)] + [make_sample(f"x{i}", 900 + i) for i in range(5)]
    )
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 6, "00001.tar": 6}))
    module = _module()
    seen_bad: Counter = Counter()

    class Count(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen_bad.update(batch["bad_samples"])

    fit_one_epoch(tmp_path, module, Count(), decode_on="device")
    assert len(module.seen) == 3 and all(x.dtype == torch.float32 and x.shape == (4, 3, 16, 16) for x in module.seen)
    assert seen_bad == {"skipped/corrupt_image": 1, "refilled": 1}


def fit_one_epoch(shards, module, callback, **data_settings) -> WebDatasetDataModule:
    """One epoch of a real Lightning fit on the CPU, 16-px images, batch 4, ``data_settings`` for the loader."""
    import lightning as L

    dm = WebDatasetDataModule(
        str(shards),
        batch_size=4,
        num_workers=0,
        image_size=16,
        context_length=8,
        seed=5,
        shuffle_buffer=4,
        **data_settings,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=shards,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )
    trainer.fit(module, datamodule=dm)
    return dm


def test_quick_jpeg_header_walk_agrees_with_pil():
    """The worker's header walk (device path) gives PIL's size, mode and draft size, or defers to PIL."""
    import io

    from PIL import Image

    from clip_pl.data.decode import draft_for, open_image
    from clip_pl.data.jpeg import draft_size, jpeg_frame

    cases = []
    for i, (w, h) in enumerate([(40, 44), (448, 500), (1000, 460), (300, 1800), (225, 224)]):
        img = synthetic_image(i, w, h)
        cases.append(jpeg_bytes(img))
        cases.append(jpeg_bytes(img.convert("L")))
        progressive = io.BytesIO()
        img.save(progressive, format="JPEG", progressive=True, quality=80)
        cases.append(progressive.getvalue())
    for data in cases:
        width, height, components = jpeg_frame(data)
        reference = open_image(data)
        assert (width, height) == reference.size and {1: "L", 3: "RGB"}[components] == reference.mode
        for target in (32, 224):
            reference = open_image(data)
            draft_for(reference, target)
            assert draft_size(width, height, target) == reference.size, (width, height, target)
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    assert jpeg_frame(png.getvalue()) is None and jpeg_frame(b"\xff\xd8\xff\xda\x00\x02") is None
    assert jpeg_frame(b"\xff\xd8\xff\xe0\x00") is None, "a segment cut short: PIL decides"


def test_resampled_shards_on_the_device_path(tmp_path):
    """Resampled epochs take the device path too; the first batch's spares are extra draws from the stream."""
    write_shards(str(tmp_path), [6, 6], image_px=(24, 60))
    write_shard(
        str(tmp_path / "00002.tar"),
        [device_only_failure(i) for i in range(2)] + [make_sample(f"r{i}", 700 + i) for i in range(4)],
    )
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 6, "00001.tar": 6, "00002.tar": 6}))
    batches = _batches(tmp_path, "device", resampled=True, num_samples=40, num_workers=1)
    assert len(batches) == 10 and all(b["image"].shape == (4, 3, 32, 32) for b in batches)
    keys = [k for b in batches for k in b["key"]]
    assert not any(k.startswith("devbad") for k in keys)
    total = _total(batches)
    assert total["skipped/corrupt_image"] == total["refilled"] > 0, "each device failure counted and refilled"
