"""The WebDataset loader on real tar shards: exact epochs across real gloo ranks, bad data, resume.

python -m pytest tests/data/test_loader.py -q
"""

from __future__ import annotations

import io
import json
import os
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from clip_pl.data import WebDatasetDataModule
from tests.support.distributed import run_distributed
from tests.support.fake_shards import jpeg_bytes, make_sample, synthetic_image, write_shard, write_shards

IMAGE_SIZE, CONTEXT = 32, 16


def _datamodule(shards, **kw) -> WebDatasetDataModule:
    args = dict(
        batch_size=4,
        num_workers=2,
        image_size=IMAGE_SIZE,
        context_length=CONTEXT,
        seed=7,
        return_keys=True,
        shuffle_buffer=16,
    )
    args.update(kw)
    return WebDatasetDataModule(shards, **args)


def _run_epochs(dm: WebDatasetDataModule, epochs: int):
    """Per epoch: (keys in order, number of batches, summed bad_samples, any partial batch?)."""
    dm.setup("fit")
    loader = dm.train_dataloader()
    out = []
    for _ in range(epochs):
        keys, batches, bad, partial = [], 0, Counter(), False
        for batch in loader:
            batches += 1
            partial |= batch["image"].shape[0] != dm.batch_size or batch["text"].shape != (dm.batch_size, CONTEXT)
            keys += batch["key"]
            bad.update(batch["bad_samples"])
        out.append((keys, batches, dict(bad), partial))
    return out


# ---- exact epochs on 2 gloo ranks × 2 workers ---------------------------------------------------


def _allow_dataloader_workers() -> None:
    """tests/support/distributed.py starts ranks as daemon processes, which multiprocessing forbids to have
    children; a rank of a real job is not a daemon, so lift the flag to let DataLoader workers start."""
    import multiprocessing

    multiprocessing.current_process()._config["daemon"] = False  # type: ignore[attr-defined]


def _exact_rank(rank, world, shard_dir, epochs):
    _allow_dataloader_workers()
    torch.set_num_threads(1)
    dm = _datamodule(shard_dir)
    return dm.batches_per_epoch(), _run_epochs(dm, epochs)


@pytest.mark.slow  # multi-process or subprocess: > ~10 s on 2 cores (make test-quick leaves it out)
def test_exact_epochs_two_ranks_two_workers_uneven_shards(tmp_path):
    # 64 samples in 6 very uneven shards (one with a single sample), batch 4 × 2 ranks → 8 batches per rank.
    sizes = [13, 5, 22, 1, 9, 14]
    write_shards(str(tmp_path), sizes)
    all_keys = {f"{s:05d}{i:04d}" for s, n in enumerate(sizes) for i in range(n)}
    results = run_distributed(_exact_rank, 2, args=(str(tmp_path), 2))
    per_epoch_rank_keys = []
    for epoch in range(2):
        keys = [results[r][1][epoch][0] for r in range(2)]
        for r in range(2):
            expected_batches, epochs = results[r]
            _, batches, bad, partial = epochs[epoch]
            assert expected_batches == 8 and batches == 8, "every rank yields the announced number of batches"
            assert not partial and bad == {}
        merged = keys[0] + keys[1]
        assert len(merged) == len(set(merged)) == 64, "no sample twice within an epoch"
        assert set(merged) == all_keys, "every sample once per epoch"
        per_epoch_rank_keys.append(set(keys[0]))
    assert per_epoch_rank_keys[0] != per_epoch_rank_keys[1], "the split across ranks changes with the epoch"


def _split_rank(rank, world, shard_dir):
    _allow_dataloader_workers()
    torch.set_num_threads(1)
    return _run_epochs(_datamodule(shard_dir), 1)[0]


@pytest.mark.slow  # multi-process or subprocess: > ~10 s on 2 cores (make test-quick leaves it out)
def test_fewer_shards_than_ranks_times_workers_and_left_over(tmp_path):
    # 2 shards for 2 ranks × 2 workers; 42 samples → 5 batches per rank, 2 samples left this epoch.
    write_shards(str(tmp_path), [30, 12])
    seen, counts = [], []
    for keys, batches, bad, partial in run_distributed(_split_rank, 2, args=(str(tmp_path),)):
        seen += keys
        counts.append(batches)
        assert not partial and bad == {}
    assert counts == [5, 5]
    assert len(seen) == len(set(seen)) == 40


def test_setup_errors_are_clear(tmp_path):
    write_shards(str(tmp_path), [3, 2])
    with pytest.raises(ValueError, match="less than one global batch"):
        _datamodule(str(tmp_path), batch_size=8).setup("fit")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        _datamodule(str(tmp_path / "{00000..00009}.tar")).setup("fit")
    os.remove(tmp_path / "sizes.json")
    with pytest.raises(ValueError, match="sizes.json"):
        _datamodule(str(tmp_path / "{00000..00001}.tar")).setup("fit")
    with pytest.raises(ValueError, match="resampled=true"):
        _datamodule(f"{tmp_path}/00000.tar::{tmp_path}/00001.tar", train_weights="1::3")


# ---- bad data ----------------------------------------------------------------------------------


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _broken_samples() -> tuple[list[dict], Counter]:
    good = synthetic_image(1, 48, 40)
    caption = b"a picture"
    jpg = jpeg_bytes(good)
    cmyk = io.BytesIO()
    good.convert("CMYK").save(cmyk, format="JPEG")
    rgba = good.convert("RGBA")
    rgba.putalpha(128)
    sixteen = Image.fromarray(np.asarray(good.convert("L"), dtype=np.uint16) * 257)
    samples = [
        {"jpg": b"\xff\xd8\xff\xe0" + bytes(random.Random(0).randbytes(300)), "txt": caption},
        {"jpg": jpg[: len(jpg) // 2], "txt": caption},  # truncated JPEG
        {"txt": caption, "json": b"{}"},  # no image
        {"jpg": jpg, "json": b"{}"},  # no caption
        {"jpg": jpg, "txt": b"  \n\t"},
        {"jpg": jpg, "txt": b"caf\xe9 \xff\xfe"},  # latin-1, not UTF-8
        {"png": _png(Image.new("L", (2500, 2000))), "txt": caption},  # 5 Mpx > the 4 Mpx limit below
        {"jpg": jpeg_bytes(good.convert("L")), "txt": caption},
        {"jpg": cmyk.getvalue(), "txt": caption},
        {"png": _png(good.convert("P")), "txt": caption},
        {"png": _png(rgba), "txt": caption},
        {"png": _png(sixteen), "txt": caption},
    ]
    expected = Counter(
        {
            "skipped/corrupt_image": 2,
            "skipped/missing_image": 1,
            "skipped/missing_caption": 1,
            "skipped/empty_caption": 1,
            "skipped/non_utf8_caption": 1,
            "skipped/decompression_bomb": 1,
            "converted/grayscale": 1,
            "converted/cmyk": 1,
            "converted/palette": 1,
            "converted/alpha": 1,
            "converted/16bit": 1,
        }
    )
    for i, s in enumerate(samples):
        s["__key__"] = f"bad{i:03d}"
    return samples, expected


def _write_broken_corpus(directory) -> Counter:
    """12 good shards samples + a shard of broken samples + a truncated tar + an unreadable tar."""
    write_shards(str(directory), [12, 12])
    samples, expected = _broken_samples()
    write_shard(str(directory / "00002.tar"), samples)
    write_shard(str(directory / "00003.tar"), [make_sample(f"trunc{i}", 100 + i) for i in range(6)])
    data = (directory / "00003.tar").read_bytes()
    (directory / "00003.tar").write_bytes(data[: len(data) // 2])
    (directory / "00004.tar").write_bytes(b"this is not a tar file" * 100)
    sizes = json.loads((directory / "sizes.json").read_text())
    sizes.update({"00002.tar": len(samples), "00003.tar": 6, "00004.tar": 6})
    (directory / "sizes.json").write_text(json.dumps(sizes))
    expected["skipped/unreadable_tar"] = 6
    return expected


def _broken_rank(rank, world, shard_dir):
    _allow_dataloader_workers()
    torch.set_num_threads(1)
    from clip_pl.data import sum_over_ranks

    dm = _datamodule(shard_dir, max_image_pixels=4_000_000)
    epoch = _run_epochs(dm, 1)[0]
    return dm.batches_per_epoch(), epoch, sum_over_ranks(epoch[2])


@pytest.mark.slow  # multi-process or subprocess: > ~10 s on 2 cores (make test-quick leaves it out)
def test_broken_samples_are_counted_not_fatal_across_ranks(tmp_path):
    expected = _write_broken_corpus(tmp_path)  # 48 positions → 6 batches of 4 per rank
    results = run_distributed(_broken_rank, 2, args=(str(tmp_path),))
    total, good_keys = Counter(), []
    for announced, (keys, batches, bad, partial), _ in results:
        assert announced == batches == 6 and not partial
        total.update(bad)
        good_keys += keys
    assert results[0][2] == results[1][2] == dict(total), "sum_over_ranks gives every rank the global totals"
    truncated = total.pop("skipped/truncated_tar", 0)
    assert 1 <= truncated <= 6, "the truncated tar loses its tail, counted per lost sample"
    refilled = total.pop("refilled")
    assert total == expected
    skipped = truncated + sum(v for k, v in expected.items() if k.startswith("skipped/"))
    assert refilled == skipped, "every skipped position is refilled so batches stay full"
    assert len(good_keys) == 48
    distinct = set(good_keys)
    assert len(distinct) == 48 - skipped, "all good samples were used, the fillers repeat good ones"


def test_large_jpeg_is_decoded_in_draft_mode():
    from clip_pl.data.decode import decode_image

    big = jpeg_bytes(synthetic_image(3, 1024, 768))
    img = decode_image({"jpg": big}, 224, Counter())
    assert img.mode == "RGB" and min(img.size) >= 224 and img.size == (512, 384)


# ---- resume ------------------------------------------------------------------------------------


class _KeyRecorder:  # a LightningModule built lazily so importing this file stays cheap
    @staticmethod
    def make():
        import lightning as L

        class Recorder(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(3, 1)
                self.keys: list[str] = []
                self.pixels: list[float] = []

            def training_step(self, batch, batch_idx):
                self.keys += batch["key"]
                image = batch["image"].float()  # uint8 pixels: no CLIPModule here to normalise them
                self.pixels += image.sum(dim=(1, 2, 3)).tolist()
                return self.layer(image.mean(dim=(2, 3))).mean()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.01)

        return Recorder()


def _trainer(tmp_path, callbacks=(), **kw):
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        **kw,
    )


def test_resume_mid_epoch_through_lightning_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    shards = tmp_path / "shards"
    write_shards(str(shards), [9, 14, 5, 12])  # 40 samples → 10 batches of 4
    first = _KeyRecorder.make()
    every_3 = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=3, save_top_k=-1)
    # The run "dies" after step 5; the last checkpoint it wrote is the one of step 3.
    _trainer(tmp_path, callbacks=[every_3], max_steps=5).fit(first, datamodule=_datamodule(str(shards)))
    ckpt = str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    saved = torch.load(ckpt, weights_only=False)["WebDatasetDataModule"]
    assert (saved["epoch"], saved["batches_consumed"]) == (0, 3)

    second = _KeyRecorder.make()
    _trainer(tmp_path, max_epochs=2).fit(second, datamodule=_datamodule(str(shards)), ckpt_path=ckpt)
    epoch0 = first.keys[:12] + second.keys[:28]
    assert len(second.keys) == 28 + 40, "the resumed epoch has 7 batches left, the next one all 10"
    assert len(set(epoch0)) == 40, "after the resume no sample of the epoch repeats or is skipped"

    reference = _KeyRecorder.make()
    _trainer(tmp_path, max_epochs=2).fit(reference, datamodule=_datamodule(str(shards)))
    assert reference.keys == epoch0 + second.keys[28:], "resumed run == uninterrupted run, sample for sample"
    resumed_pixels = first.pixels[:12] + second.pixels
    assert reference.pixels == pytest.approx(resumed_pixels), "and crop for crop (augmentation seeded per batch)"
    assert set(reference.keys[40:]) == set(epoch0) and reference.keys[40:] != epoch0, "epoch 1 reshuffles"


def _shard_dirs(tmp_path):
    """The saved run's shards, and shards that differ only in identity: other files of the same
    count and sizes, or the same files with other sizes of the same total."""
    saved, other, resized = tmp_path / "saved", tmp_path / "other", tmp_path / "resized"
    write_shards(str(saved), [10, 10])
    write_shards(str(other), [10, 10])
    write_shards(str(resized), [10, 10])
    (resized / "sizes.json").write_text(json.dumps({"00000.tar": 12, "00001.tar": 8}))
    return saved, other, resized


# One changed setting each (and which fingerprint entry must name it); the README promises
# that every one of them refuses a mid-epoch resume of an exact epoch.
CHANGED_SETTINGS = {
    "world_size": ({}, "world_size"),  # the saved state comes from 2 ranks, this is 1
    "batch_size": ({"batch_size": 2}, "batch_size"),
    "num_workers": ({"num_workers": 1}, "num_workers"),
    "seed": ({"seed": 8}, "seed"),
    "other_shards_same_count": ({"shards": "other"}, "shards_sha256"),
    "same_shards_other_sizes": ({"shards": "resized"}, "shards_sha256"),
    "shard_order": ({"shards": "reordered"}, "shards_sha256"),
    "epoch_length": ({"num_samples": 16}, "epoch_samples"),
}


@pytest.mark.parametrize("case", CHANGED_SETTINGS)
def test_mid_epoch_resume_refuses_every_changed_setting(tmp_path, case):
    saved, other, resized = _shard_dirs(tmp_path)
    state = {"epoch": 0, "batches_consumed": 1, **_datamodule(str(saved))._fingerprint()}
    same = _datamodule(str(saved))
    same.load_state_dict(dict(state))  # the same settings resume
    assert same._resume == {"epoch": 0, "batches_consumed": 1}
    if case == "world_size":
        state["world_size"] = 2

    change, key = CHANGED_SETTINGS[case]
    change = dict(change)
    spec = {
        "other": str(other),
        "resized": str(resized),
        None: str(saved),
        "reordered": f"{saved}/00001.tar::{saved}/00000.tar",
    }[change.pop("shards", None)]
    changed = _datamodule(spec, **change)
    with pytest.raises(ValueError, match=f"stopped mid-epoch with other loader settings.*'{key}'"):
        changed.load_state_dict(dict(state))
    changed.load_state_dict({**state, "batches_consumed": 0})  # from an epoch's start any setting may change
    assert changed._resume == {"epoch": 0, "batches_consumed": 0}
    saved_batches = state["epoch_samples"] // (state["world_size"] * state["batch_size"])
    changed.load_state_dict({**state, "batches_consumed": saved_batches})  # and from its end
    changed.setup("fit")
    loader = changed.train_dataloader()
    assert [len(list(loader)) for _ in range(2)] == [0, changed.batches_per_epoch()], (
        "resumed after an epoch's last batch: nothing left of it, then the next epoch in full"
    )


def test_resampled_resume_is_never_refused(tmp_path):
    saved, other, _ = _shard_dirs(tmp_path)
    state = {
        "epoch": 0,
        "batches_consumed": 2,
        **_datamodule(str(saved), resampled=True, num_samples=40)._fingerprint(),
    }
    resumed = _datamodule(str(other), resampled=True, num_samples=40, num_workers=3)
    resumed.load_state_dict(state)  # draws with replacement: there is no exact position to lose
    assert resumed._resume == {"epoch": 0, "batches_consumed": 2}


def _resampled_rank(rank, world, shard_dir):
    torch.set_num_threads(1)

    def stream(resume=None):
        dm = _datamodule(shard_dir, resampled=True, num_samples=64, num_workers=0)
        if resume is not None:
            dm.resume_from(0, resume)
        ((keys, batches, bad, partial),) = _run_epochs(dm, 1)
        assert not partial and bad == {}
        return keys, batches

    return {"fresh": stream(), "again": stream(), "resumed": stream(resume=3)}


@pytest.mark.slow  # multi-process or subprocess: > ~10 s on 2 cores (make test-quick leaves it out)
def test_resampled_is_reproducible_differs_per_rank_and_does_not_replay_after_resume(tmp_path):
    write_shards(str(tmp_path), [10, 6, 8])
    ranks = run_distributed(_resampled_rank, 2, args=(str(tmp_path),))
    (a, nb), (b, _) = ranks[0]["fresh"], ranks[1]["fresh"]
    assert nb == 8, "64 samples over 2 ranks × 4"
    assert a != b, "ranks draw different streams"
    assert ranks[0]["again"][0] == a, "same seed, epoch and rank → same stream"
    resumed, nb_resumed = ranks[0]["resumed"]
    assert nb_resumed == 5
    assert resumed != a[12:], "a resumed stream must not replay what the interrupted run would have drawn"


def test_logged_bad_sample_totals_equal_what_the_shards_hold(tmp_path):
    """Through the entry point: the last ``data/bad_samples/*`` row of metrics.csv holds the whole
    epoch's totals, reason by reason, as built into the corpus (sums over steps, not the last step's)."""
    import csv

    from clip_pl.train import train
    from tests.support.config import SMALLER, make_cfg

    expected = _write_broken_corpus(tmp_path / "shards")  # 48 positions → 12 batches of 4
    cfg = make_cfg(
        [
            "model=tiny",
            *SMALLER,
            "trainer=cpu",
            "data=wds",
            f"data.train_shards={tmp_path / 'shards'}",
            "data.batch_size=4",
            "data.num_workers=2",
            "data.max_image_pixels=4000000",
            "logger=csv",
            "global_batch_size=null",
            "trainer.max_steps=12",
            "trainer.log_every_n_steps=4",
            "scheduler.warmup_steps=1",
            "callbacks.checkpoint.every_n_train_steps=0",
            "callbacks.progress_bar=null",
        ],
        tmp_path,
    )
    train(cfg)
    with open(tmp_path / "runs" / "test" / "csv" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("perf/samples_per_s")]
    assert [int(float(r["step"])) for r in rows] == [1, 4, 8, 12]
    logged = [
        {k[len("data/bad_samples/") :]: int(float(v)) for k, v in r.items() if k.startswith("data/bad_samples/") and v}
        for r in rows
    ]
    final = Counter(logged[-1])
    truncated = final.pop("skipped/truncated_tar", 0)
    assert 1 <= truncated <= 6
    refilled = final.pop("refilled")
    assert final == expected, "every reason's total, as the shards hold them"
    assert refilled == truncated + sum(v for k, v in expected.items() if k.startswith("skipped/"))
    for earlier, later in zip(logged, logged[1:]):  # running totals never go down
        assert all(later.get(k, 0) >= v for k, v in earlier.items())


# ---- manifests that disagree with the shards, and data that is broken as a whole -----------------


def test_stale_manifest_shards_longer_or_shorter_than_sizes_json(tmp_path):
    # sizes.json says 8 and 4, the tars hold 10 and 2: exact epochs keep the manifest's positions.
    write_shards(str(tmp_path), [10, 2])
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 8, "00001.tar": 4}))
    dm = _datamodule(str(tmp_path))  # 2 workers: each refills from the other's slice
    ((keys, batches, bad, partial),) = _run_epochs(dm, 1)
    assert batches == 3 and not partial
    assert bad == {"skipped/not_in_manifest": 2, "skipped/shorter_than_manifest": 2, "refilled": 2}
    assert set(keys) <= {f"00000{i:04d}" for i in range(8)} | {"000010000", "000010001"}
    assert len(set(keys)) == 10, "the 8 + 2 samples the manifest covers and the tars hold, two of them twice"


def test_resampled_data_that_is_bad_as_a_whole_stops_with_an_error(tmp_path, monkeypatch):
    import clip_pl.data.stream as stream

    broken = tmp_path / "broken"
    broken.mkdir()
    samples = [{"__key__": f"k{i}", "jpg": b"not a jpeg", "txt": b"a caption"} for i in range(5)]
    for shard in range(2):
        write_shard(str(broken / f"{shard:05d}.tar"), samples)
    monkeypatch.setattr(stream, "MAX_CONSECUTIVE_BAD", 7)  # the real limit (20 000) would only take longer
    dm = _datamodule(str(broken / "{00000..00001}.tar"), resampled=True, num_samples=8, num_workers=0)
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="8 unusable samples in a row.*skipped/corrupt_image"):
        next(iter(dm.train_dataloader()))

    empty = tmp_path / "empty"
    empty.mkdir()
    for shard in range(3):
        (empty / f"{shard:05d}.tar").write_bytes(b"this is not a tar file")
    dm = _datamodule(str(empty / "{00000..00002}.tar"), resampled=True, num_samples=8, num_workers=0)
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="21 shards in a row gave no sample"):
        next(iter(dm.train_dataloader()))
