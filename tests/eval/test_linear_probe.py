"""Linear probe: the same weight decay and test metrics as clip_benchmark's own training, peak search and
inference on the same features; few-shot k; deterministic; the caller's RNG untouched.

clip_benchmark's linear probe hard-codes CUDA (``model.cuda()``, ``x.cuda()``) and its ``accuracy`` helper
calls float() on a 1-element array, which NumPy 2 refuses. So on CPU its ``find_peak``/``train``/``infer``
run with ``.cuda()`` made the identity and ``accuracy`` replaced by the same top-k count; the arithmetic
compared is theirs. Its ``evaluate`` chains them as in :func:`clip_benchmark_probe` (the cached-features
path: few-shot permutation, coarse 7-point sweep, spans 8→1, refit on train+val).

    pytest tests/eval/test_linear_probe.py
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score
from torch.utils.data import DataLoader

from benchmarks.eval_suite import clip_benchmark_weight_decay
from clip_pl.eval.common import no_autocast
from clip_pl.eval.linear_probe import encode_labelled, fit_and_score
from clip_pl.eval.suite import evaluate_tasks
from clip_pl.eval.tasks import DataSpec, load_task_list
from tests.support.eval import labelled_samples, random_images, tiny_model, write_imagefolder, write_shards
from tests.support.eval_tasks import write_task_list

linear_probe = pytest.importorskip("clip_benchmark.metrics.linear_probe")
TOLERANCE = 1e-3  # 0.1 percentage point
SEED = 3


def _split(root, n: int, seed: int, classes: int = 6):
    images = random_images(n, seed=seed)
    # Class c is drawn a little more often when c is small: uneven classes, as real sets are.
    labels = [min(i % (classes + 2), classes - 1) for i in range(n)]
    return write_imagefolder(root, images, labels)


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    model, config = tiny_model(seed=5)
    folders = {
        split: _split(root / split, n, seed) for split, n, seed in (("train", 64, 1), ("val", 24, 2), ("test", 40, 3))
    }
    features = {
        split: encode_labelled(model, config, DataSpec("imagefolder", str(path)), 16, 0, no_autocast, Counter())
        for split, path in folders.items()
    }
    return {"root": root, "model": model, "config": config, "features": features}


def _accuracy(output, target, topk=(1,)):
    top = output.topk(max(topk), 1, True, True)[1].t() == target.view(1, -1)
    return [float(top[:k].float().sum()) / len(target) for k in topk]


def clip_benchmark_probe(train, val, test, fewshot_k: int, seed: int, monkeypatch) -> dict[str, float]:
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(linear_probe, "accuracy", _accuracy)
    torch.manual_seed(seed)
    features, targets = train
    taken: Counter = Counter()
    idxs = [
        p
        for p in torch.randperm(len(features)).tolist()
        if (fewshot_k < 0 or taken[int(targets[p])] < fewshot_k) and not taken.update([int(targets[p])])
    ]
    train_loader = DataLoader(linear_probe.FeatureDataset(features[idxs], targets[idxs]), batch_size=64, shuffle=True)
    val_loader = DataLoader(linear_probe.FeatureDataset(*val), batch_size=64, shuffle=True)
    both = linear_probe.FeatureDataset(
        np.concatenate((features[idxs], val[0])), np.concatenate((targets[idxs], val[1]))
    )
    classes = int(targets.max()) + 1
    weight_decay = clip_benchmark_weight_decay(train_loader, val_loader, features.shape[1], classes, seed)
    final_loader = train_loader if fewshot_k > 0 else DataLoader(both, batch_size=64, shuffle=True)
    model = linear_probe.train(final_loader, features.shape[1], classes, weight_decay, 0.1, 10, False, "cpu", seed)
    logits, target = linear_probe.infer(
        model, DataLoader(linear_probe.FeatureDataset(*test), batch_size=64), False, "cpu"
    )
    acc1, acc5 = _accuracy(logits.float(), target, topk=(1, 5))
    return {
        "weight_decay": weight_decay,
        "lp_acc1": acc1,
        "lp_acc5": acc5,
        "lp_mean_per_class_recall": balanced_accuracy_score(target, logits.argmax(1)),
    }


@pytest.mark.parametrize("fewshot_k", [-1, 4])
def test_the_probe_gives_clip_benchmarks_numbers(probe_data, fewshot_k, monkeypatch):
    f = probe_data["features"]
    ours = fit_and_score(f["train"], f["val"], f["test"], fewshot_k, SEED)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as clip_pl fits small probes: ~20x faster on a loaded 2-core box, same arithmetic
    try:
        theirs = clip_benchmark_probe(f["train"], f["val"], f["test"], fewshot_k, SEED, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    assert ours["weight_decay"] == theirs.pop("weight_decay")
    for metric, value in theirs.items():
        assert abs(ours[metric] - value) <= TOLERANCE, (metric, ours[metric], value)
    assert 1 / 6 < ours["lp_acc1"] < 1  # it learns something, not everything
    assert abs(ours["lp_acc1"] - ours["lp_mean_per_class_recall"]) > 1e-3


def test_a_probe_task_is_deterministic_and_leaves_the_callers_rng_alone(probe_data):
    root = probe_data["root"]
    images = random_images(64, seed=1)
    write_shards(root / "train_shards", labelled_samples(images, [min(i % 8, 5) for i in range(64)]), 2)
    path = write_task_list(
        root / "tasks.yaml",
        "tasks:\n  probe:\n    type: linear_probe\n    train: train\n"
        "    test: test\n    val_fraction: 0.25\n  probe3:\n"
        "    type: linear_probe\n    train: train\n    test: test\n    fewshot_k: 3\n"
        "  shards:\n    type: linear_probe\n    train: train_shards\n    test: test\n",
    )
    tasks = load_task_list(path)
    first = evaluate_tasks(probe_data["model"], probe_data["config"], tasks, batch_size=16)
    # Other batches and two loader workers, whose batches of the two shards interleave: the features come
    # back in the data's order all the same.
    model, config, spec = probe_data["model"], probe_data["config"], tasks[2].train
    features, labels = encode_labelled(model, config, spec, 16, 0, no_autocast, Counter())
    features2, labels2 = encode_labelled(model, config, spec, 7, 2, no_autocast, Counter())
    assert labels.tolist() == [min(i % 8, 5) for i in range(64)] and torch.equal(labels2, labels)
    torch.testing.assert_close(features2, features)
    assert first["probe"]["train_samples"] == 64 and first["probe"]["val_samples"] == 16  # refit on train + val
    assert first["probe"]["test_samples"] == 40 and set(first["probe"]) >= {
        "lp_acc1",
        "lp_acc5",
        "lp_mean_per_class_recall",
    }
    assert first["probe3"]["train_samples"] == 6 * 3
    f = probe_data["features"]
    torch.manual_seed(0)
    state = torch.get_rng_state()
    fit_and_score(f["train"], f["val"], f["test"], 2, 0)  # seeds its own (forked) RNG
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="fewshot_k=20: class"):
        fit_and_score(f["train"], f["val"], f["test"], 20, 0)
