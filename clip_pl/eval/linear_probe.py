"""Linear probe: image features once, then multinomial logistic regression on them, with the weight decay
chosen on a validation split — clip_benchmark's procedure, so the numbers are comparable with its.

1. Every rank encodes its slice of train / val / test; the features are gathered and put back in the
   data's own order (shard, then sample; ImageFolder index), so 1 or N ranks and any number of loader
   workers give the same arrays.
2. A seeded permutation of the training set (the first k per class for ``fewshot_k`` = k).
3. The classifier is an ``nn.Linear`` trained with cross-entropy by AdamW (lr 0.1, cosine decay to 0,
   10 epochs, batches of 64 shuffled by the seeded RNG) — logistic regression with an L2 penalty.
4. The weight decay is searched on 97 log-spaced values in [1e-6, 1e2]: 7 coarse ones, then three
   around the best with the step halved from 8 to 1, each scored by top-1 on the validation split
   (OpenAI CLIP's sweep, A.3, with AdamW instead of L-BFGS, as clip_benchmark does). Without a ``val``
   set, a seeded ``val_fraction`` of the training set is held out for the search.
5. The final classifier is trained with the chosen decay on train + val (few-shot: the k-shot set
   only) and scored on test: ``lp_acc1``, ``lp_acc5`` (only when the test labels reach 5, as
   clip_benchmark), ``lp_mean_per_class_recall``.

All randomness comes from ``seed`` inside :func:`torch.random.fork_rng`, so the global RNG (training's)
is left as it was, and every rank fits the same classifier.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from clip_pl.distributed import rank_and_world_size
from clip_pl.eval import datasets
from clip_pl.eval.common import AutocastFactory, bad_sample_metrics, evaluation_mode, no_autocast, placement
from clip_pl.eval.distributed import gather_rows
from clip_pl.eval.tasks import DataSpec, Task
from clip_pl.eval.zeroshot import class_counts, mean_per_class_recall, topk_hits
from clip_pl.model import image_size_of, image_transforms

LR, EPOCHS, BATCH_SIZE = 0.1, 10, 64
WEIGHT_DECAYS = np.logspace(-6, 2, num=97).tolist()
COARSE_WEIGHT_DECAYS = np.logspace(-6, 2, num=7).tolist()
SMALL_PROBE_ELEMENTS = 1 << 22  # training features (rows × dims) up to which one CPU thread is faster


def encode_labelled(
    model: nn.Module,
    model_config: Mapping[str, Any],
    data: DataSpec,
    batch_size: int,
    num_workers: int,
    autocast: AutocastFactory,
    bad: Counter,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit image features, labels) of the whole set on every rank, in the data's order. Collective."""
    rank, world_size = rank_and_world_size()
    transform = image_transforms(image_size_of(model_config))[1]
    dataset = datasets.labelled_for_rank(
        data.path, transform, None, data.label_key, rank, world_size, with_position=True
    )
    device, dtype = placement(model)
    features, labels, positions = [], [], []
    with evaluation_mode(model):
        for batch, skipped in datasets.loader(dataset, batch_size, num_workers):
            bad.update(skipped)
            if batch is None:
                continue
            images, batch_labels, batch_positions = batch
            with autocast():
                features.append(model.encode_image(images.to(device, dtype), normalize=True).float())
            labels.append(torch.as_tensor(batch_labels, device=device))
            positions.append(torch.as_tensor(batch_positions, device=device))
    dim = int(model_config["embed_dim"])
    local = (
        torch.cat(features) if features else torch.zeros((0, dim), device=device),
        torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device),
        torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long, device=device),
    )
    all_features, all_labels, all_positions = (gather_rows(t) for t in local)
    if all_features.shape[0] == 0:
        raise ValueError(f"linear-probe data {data.path!r} yielded no samples.")
    order = all_positions.argsort()
    return all_features[order], all_labels[order].long()


def few_shot(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of a random permutation (global RNG: seeded by the caller), keeping the first k per class (k<0: all)."""
    taken: Counter = Counter()
    keep = []
    for index in torch.randperm(len(labels)).tolist():
        label = int(labels[index])
        if k < 0 or taken[label] < k:
            taken[label] += 1
            keep.append(index)
    short = {label: n for label, n in taken.items() if k > 0 and n < k}
    if short:
        raise ValueError(
            f"fewshot_k={k}: class(es) {sorted(short)} have only {sorted(short.values())} training "
            f"images; lower fewshot_k or add images."
        )
    return torch.tensor(keep, dtype=torch.long)


def train_classifier(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    seed: int,
    lr: float = LR,
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
) -> nn.Linear:
    """Logistic regression by AdamW, cosine-decayed lr, shuffled batches; seeded (global RNG) for repeatability."""
    torch.manual_seed(seed)
    linear = nn.Linear(features.shape[1], num_classes).to(features.device)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=lr, weight_decay=weight_decay)
    batches = DataLoader(TensorDataset(features, labels), batch_size=batch_size, shuffle=True)
    total = epochs * len(batches)
    step = 0
    for _ in range(epochs):
        for x, y in batches:
            for group in optimizer.param_groups:  # cosine from lr to 0 over all steps, no warm-up
                group["lr"] = 0.5 * (1 + math.cos(math.pi * step / total)) * lr
            optimizer.zero_grad()
            nn.functional.cross_entropy(linear(x), y).backward()
            optimizer.step()
            step += 1
    return linear


@torch.no_grad()
def top1(linear: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:
    return float((linear(features).argmax(dim=1) == labels).float().mean())


def best_weight_decay(
    train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], num_classes: int, seed: int
) -> float:
    """Coarse-to-fine search over WEIGHT_DECAYS by validation top-1 (ties keep the earlier candidate)."""

    def peak(candidates: list[int]) -> int:
        best, best_accuracy = 0, 0.0  # as clip_benchmark: index 0 unless some candidate scores above 0
        for index in candidates:
            accuracy = top1(train_classifier(*train, num_classes, WEIGHT_DECAYS[index], seed), *val)
            if accuracy > best_accuracy:
                best, best_accuracy = index, accuracy
        return best

    index = peak([i for i, wd in enumerate(WEIGHT_DECAYS) if wd in COARSE_WEIGHT_DECAYS])
    span = 8
    while span > 0:
        index = peak([max(index - span, 0), index, min(index + span, len(WEIGHT_DECAYS) - 1)])
        span //= 2
    return WEIGHT_DECAYS[index]


@contextlib.contextmanager
def _threads_for(features: torch.Tensor) -> Iterator[None]:
    """One CPU thread for small probes: ~20 fits of a few thousand tiny steps each, where waking a
    thread pool costs more than the arithmetic (30x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    small = features.device.type == "cpu" and features.numel() <= SMALL_PROBE_ELEMENTS
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_and_score(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    fewshot_k: int,
    seed: int,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Steps 2–5 on features already computed; leaves the global RNG as it found it. ``num_classes``:
    the largest training label + 1 unless given (the whole training set's, before a validation split)."""
    num_classes = num_classes or int(train[1].max()) + 1
    with torch.random.fork_rng(devices=[]), _threads_for(train[0]):
        torch.manual_seed(seed)
        chosen = few_shot(train[1], fewshot_k)
        train = (train[0][chosen], train[1][chosen])
        weight_decay = best_weight_decay(train, val, num_classes, seed)
        final = train if fewshot_k > 0 else (torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]))
        linear = train_classifier(*final, num_classes, weight_decay, seed)
    with torch.no_grad():
        logits = linear(test[0])
    labels = test[1]
    if int(labels.max()) >= num_classes:
        raise ValueError(f"test label {int(labels.max())} never occurs in the training set ({num_classes} classes).")
    hits = topk_hits(logits, labels, (1, 5))
    result = {"lp_acc1": float(hits[0]) / len(labels)}
    if int(labels.max()) >= 5:
        result["lp_acc5"] = float(hits[1]) / len(labels)
    result["lp_mean_per_class_recall"] = mean_per_class_recall(class_counts(logits, labels, num_classes))
    result.update(weight_decay=weight_decay, train_samples=len(final[1]))
    return result


def split_off_validation(
    features: torch.Tensor, labels: torch.Tensor, fraction: float, seed: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator).to(labels.device)
    held = max(1, round(fraction * len(labels)))
    if held >= len(labels):
        raise ValueError(f"val_fraction={fraction} leaves no training images out of {len(labels)}.")
    val, train = order[:held], order[held:]
    return (features[train], labels[train]), (features[val], labels[val])


def linear_probe_evaluate(
    model: nn.Module,
    model_config: Mapping[str, Any],
    task: Task,
    batch_size: int = 64,
    num_workers: int = 0,
    autocast: AutocastFactory = no_autocast,
) -> dict[str, Any]:
    """The probe's metrics (every rank of the default group must call it: the encoding is collective)."""
    bad: Counter = Counter()
    train = encode_labelled(model, model_config, task.train, batch_size, num_workers, autocast, bad)
    test = encode_labelled(model, model_config, task.test, batch_size, num_workers, autocast, bad)
    num_classes = int(train[1].max()) + 1
    if task.val is not None:
        val = encode_labelled(model, model_config, task.val, batch_size, num_workers, autocast, bad)
    else:
        train, val = split_off_validation(*train, task.val_fraction, task.seed)
    result: dict[str, Any] = fit_and_score(train, val, test, task.fewshot_k, task.seed, num_classes)
    result.update(val_samples=len(val[1]), test_samples=len(test[1]))
    result.update(bad_sample_metrics(bad))
    return result
