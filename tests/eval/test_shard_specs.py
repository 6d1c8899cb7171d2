"""Evaluation reads shards as training does: one spec grammar, one tar reader, one set of bad-sample rules.

pytest tests/eval/test_shard_specs.py
"""

from __future__ import annotations

import io
import shutil
import tarfile
from collections import Counter

import pytest

from clip_pl.data.decode import BadSample, decode_image
from clip_pl.data.shardspec import resolve_shards
from clip_pl.eval import datasets
from clip_pl.eval.zeroshot import zero_shot_evaluate
from tests.support.eval import (
    CLASSNAMES,
    TEMPLATES,
    labelled_samples,
    random_images,
    tiny_model,
    write_imagefolder,
    write_shards,
)

CORRUPT = b"\xff\xd8\xff\xe0 this is not a JPEG"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_specs")
    images = random_images(12, seed=3)
    labels = [i % len(CLASSNAMES) for i in range(12)]
    paths = write_shards(root / "a", labelled_samples(images, labels), num_shards=3)
    model, config = tiny_model()
    return {"root": root, "paths": paths, "model": model, "config": config}


def _evaluate(case, data, **kwargs):
    return zero_shot_evaluate(case["model"], case["config"], data, CLASSNAMES, TEMPLATES, batch_size=5, **kwargs)


def test_every_training_spec_gives_the_same_evaluation(shards):
    a = shards["root"] / "a"
    halves = shards["root"] / "halves"
    if not halves.exists():
        (halves / "x").mkdir(parents=True)
        (halves / "y").mkdir()
        shutil.copy(shards["paths"][0], halves / "x")
        for path in shards["paths"][1:]:
            shutil.copy(path, halves / "y")
    specs = {
        "folder": str(a),
        "braces": str(a / "{00000..00002}.tar"),
        "glob": str(a / "*.tar"),
        "list": shards["paths"],
        "::": f"{halves / 'x'}::{halves / 'y' / '*.tar'}",
    }
    reference = _evaluate(shards, specs["braces"])
    assert reference["samples"] == 12
    for name, spec in specs.items():
        # One grammar: the shards evaluation reads are exactly the ones training would read.
        assert len(datasets.expand_shards(spec)) == 3
        assert datasets.expand_shards(spec) == [s.url for s in resolve_shards(spec).shards], name
        assert _evaluate(shards, spec) == reference, name
    assert _evaluate(shards, f"pipe:cat {a / '{00000..00002}.tar'}") == reference  # a command, as in training


def test_a_spec_evaluation_cannot_read_is_refused_up_front(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluation data: the glob .* matches no file"):
        datasets.expand_shards(str(tmp_path / "*.tar"))
    with pytest.raises(FileNotFoundError, match="shards do not exist"):
        datasets.expand_shards(f"{shards['paths'][0]}::{tmp_path / 'gone.tar'}")


def _with_corrupt_sample_and_broken_shard(shards, tmp_path):
    """Shard 0 with one sample's image replaced by garbage; shard 1 cut off mid-way (truncated)."""
    folder = tmp_path / "bad"
    folder.mkdir()
    with tarfile.open(shards["paths"][0]) as src, tarfile.open(folder / "00000.tar", "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name == "000001.png":
                data = CORRUPT
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    whole = open(shards["paths"][1], "rb").read()
    (folder / "00001.tar").write_bytes(whole[: len(whole) // 2 + 100])
    shutil.copy(shards["paths"][2], folder / "00002.tar")
    return folder


def test_a_corrupt_eval_sample_is_skipped_and_counted_as_in_training(shards, tmp_path):
    folder = _with_corrupt_sample_and_broken_shard(shards, tmp_path)
    with pytest.raises(BadSample) as training_says:  # what the training loader's decoder calls it
        decode_image({"jpg": CORRUPT}, 64, Counter())
    reason = training_says.value.reason
    assert reason == "corrupt_image"
    result = _evaluate(shards, str(folder))
    assert result[f"bad_samples/skipped/{reason}"] == 1
    assert result["bad_samples/skipped/truncated_tar"] == 1  # the broken shard, once
    clean = _evaluate(shards, str(shards["root"] / "a"))
    assert not any(key.startswith("bad_samples/") for key in clean)
    assert 0 < result["samples"] < clean["samples"] - 1  # the corrupt one and the shard's lost tail


def test_each_bad_sample_is_counted_by_one_rank_only(shards, tmp_path):
    folder = _with_corrupt_sample_and_broken_shard(shards, tmp_path)
    urls = datasets.expand_shards(str(folder))
    identity = lambda sample, counts: (decode_image(sample, None, counts), sample["__key__"])  # noqa: E731
    for world_size in (2, 5):  # fewer shards than ranks at 5: every rank reads every shard
        counts: Counter = Counter()
        keys = []
        for rank in range(world_size):
            for item in datasets.ShardSamples(urls, identity, rank, world_size):
                if isinstance(item, datasets.Skipped):
                    counts[item.reason] += item.count
                else:
                    keys.append(item[1])
        assert counts == {"skipped/corrupt_image": 1, "skipped/truncated_tar": 1}, world_size
        assert len(keys) == len(set(keys)), world_size


def test_a_corrupt_imagefolder_image_is_skipped_and_counted_too(shards, tmp_path):
    """An ImageFolder takes the same rules: a corrupt or truncated file is counted, the others evaluated."""
    images = random_images(12, seed=3)
    labels = [i % len(CLASSNAMES) for i in range(12)]
    folder = write_imagefolder(tmp_path / "folder", images, labels)
    clean = _evaluate(shards, str(folder))
    (folder / str(labels[1]) / "0001.png").write_bytes(CORRUPT)
    cut = folder / str(labels[2]) / "0002.png"
    cut.write_bytes(cut.read_bytes()[:40])
    result = _evaluate(shards, str(folder))
    assert result["bad_samples/skipped/corrupt_image"] == 2 and result["samples"] == clean["samples"] - 2 == 10
    # The linear probe's positioned items: the bad ones stand as Skipped markers in their place.
    items = [
        datasets.labelled_for_rank(str(folder), lambda x: x, None, "cls", rank, 2, with_position=True)[i]
        for rank in (0, 1)
        for i in range(6)
    ]
    assert sum(isinstance(item, datasets.Skipped) for item in items) == 2
    order = [path for path, _ in datasets.ClassIndexImageFolder(str(folder)).samples]
    bad = {order.index(str(folder / str(labels[i]) / f"{i:04d}.png")) for i in (1, 2)}
    assert sorted(item[2] for item in items if not isinstance(item, datasets.Skipped)) == sorted(set(range(12)) - bad)
