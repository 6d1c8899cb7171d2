"""Zero-shot evaluation end to end on tiny labelled sets whose accuracy is known in advance.

The labels are chosen from an independent per-image computation of the model's class ranking
(best / 3rd best / worst class), so top-1 and top-5 are known exactly before evaluating.

    pytest tests/eval/test_zeroshot.py
"""

from __future__ import annotations

import pytest

from clip_pl.callbacks.evaluation import ZeroShotCallback
from clip_pl.eval.zeroshot import zero_shot_evaluate
from tests.support.eval import (
    CLASSNAMES,
    TEMPLATES,
    labelled_samples,
    labels_with_known_accuracy,
    oracle_class_order,
    random_images,
    tiny_checkpoint,
    write_imagefolder,
    write_shards,
)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("zeroshot")
    checkpoint, model, config = tiny_checkpoint(root / "tiny.ckpt")
    images = random_images(13, seed=1)
    labels, top1, top5 = labels_with_known_accuracy(oracle_class_order(model, config, images, CLASSNAMES, TEMPLATES))
    return {
        "checkpoint": checkpoint,
        "model": model,
        "config": config,
        "top1": top1,
        "top5": top5,
        "labels": labels,
        "folder": write_imagefolder(root / "folder", images, labels),
        "shards": write_shards(root / "shards", labelled_samples(images, labels), num_shards=3),
    }


def _evaluate(case, data, **kwargs):
    return zero_shot_evaluate(case["model"], case["config"], data, CLASSNAMES, TEMPLATES, batch_size=4, **kwargs)


def test_imagefolder_accuracy_is_the_known_one(labelled):
    result = _evaluate(labelled, str(labelled["folder"]))
    # Image i is right at top-1 exactly when i % 3 == 0: per class, the share of its images that are.
    labels = labelled["labels"]
    recalls = [
        sum(1 for i in members if i % 3 == 0) / len(members)
        for members in ([i for i, y in enumerate(labels) if y == c] for c in sorted(set(labels)))
    ]
    assert result == {
        "top1": pytest.approx(labelled["top1"]),
        "top5": pytest.approx(labelled["top5"]),
        "mean_per_class_recall": pytest.approx(sum(recalls) / len(recalls)),
        "samples": 13,
    }
    assert 0 < labelled["top1"] < labelled["top5"] < 1


def test_labelled_webdataset_gives_the_same_accuracy_with_workers(labelled):
    pattern = str(labelled["folder"].parent / "shards" / "{00000..00002}.tar")
    result = _evaluate(labelled, pattern, num_workers=2)
    assert result == _evaluate(labelled, str(labelled["folder"]))


def test_numeric_class_folders_map_to_their_number(tmp_path, labelled):
    # Folder "10" must be class 10, not class 2 as a plain sorted ImageFolder would make it.
    images = random_images(3, seed=7)
    names = [f"class {i}" for i in range(11)]
    write_imagefolder(tmp_path, images, [0, 2, 10])
    from clip_pl.eval.datasets import imagefolder_for_rank

    dataset = imagefolder_for_rank(tmp_path, lambda im: im, len(names), 0, 1)
    assert sorted(label for _, label in dataset) == [0, 2, 10]
    with pytest.raises(ValueError, match="one line per class folder"):
        imagefolder_for_rank(tmp_path, lambda im: im, 5, 0, 1)


def test_model_is_returned_in_its_training_mode(labelled):
    model = labelled["model"].train()
    try:
        _evaluate(labelled, str(labelled["folder"]))
        assert model.training
    finally:
        model.eval()


def test_bad_inputs_fail_before_evaluating(tmp_path, labelled):
    with pytest.raises(ValueError, match="duplicated"):
        ZeroShotCallback(data=str(labelled["folder"]), classnames=["cat", "dog", "cat"], templates=TEMPLATES)
    with pytest.raises(FileNotFoundError, match="shards do not exist"):
        ZeroShotCallback(data=str(tmp_path / "{0..3}.tar"), classnames=CLASSNAMES, templates=TEMPLATES)
    with pytest.raises(FileNotFoundError, match="neither a directory"):
        ZeroShotCallback(data=str(tmp_path / "nowhere"), classnames=CLASSNAMES, templates=TEMPLATES)
    with pytest.raises(ValueError, match="outside the 3 class names"):
        zero_shot_evaluate(labelled["model"], labelled["config"], labelled["shards"], CLASSNAMES[:3], TEMPLATES)
    with pytest.raises(ValueError, match="one line per class folder"):
        zero_shot_evaluate(labelled["model"], labelled["config"], str(labelled["folder"]), CLASSNAMES[:2], TEMPLATES)
