"""Zero-shot classification: class embeddings from names × prompt templates, top-1 / top-5.

Each class embedding is the mean of its prompts' unit text embeddings, renormalised (prompt
ensembling on the unit sphere, open_clip's ``build_zero_shot_classifier``). With several ranks,
the classes are encoded in rank blocks and gathered, the images are split across ranks, and only
the hit counts are summed, so the result equals the single-process one for any split.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torch import nn

from clip_pl.distributed import rank_and_world_size
from clip_pl.eval import datasets
from clip_pl.eval.common import AutocastFactory, bad_sample_metrics, evaluation_mode, no_autocast, placement
from clip_pl.eval.distributed import all_reduce_sum, contiguous_slice, gather_rows
from clip_pl.model import context_length_of, get_tokenizer, image_size_of, image_transforms

TOP_K = (1, 5)


def build_classifier(
    model: nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[str],
    embed_dim: int,
    classes_per_batch: int = 10,
    autocast: AutocastFactory = no_autocast,
) -> torch.Tensor:
    """(D, C) unit class embeddings; each rank encodes a block of classes, all ranks get all."""
    rank, world_size = rank_and_world_size()
    device, _ = placement(model)
    mine = list(classnames[contiguous_slice(len(classnames), rank, world_size)])
    if mine:
        with autocast():
            block = build_zero_shot_classifier(
                model, tokenizer, mine, list(templates), num_classes_per_batch=classes_per_batch, device=device
            )
        block = block.T.float()
    else:
        block = torch.zeros((0, embed_dim), device=device)
    return gather_rows(block.contiguous()).T


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = TOP_K) -> torch.Tensor:
    """How many rows have their label among the k highest logits, for each k (k capped at #classes)."""
    largest = min(max(ks), logits.shape[1])
    top = logits.topk(largest, dim=1).indices
    found = top == labels[:, None]
    return torch.stack([found[:, : min(k, largest)].any(dim=1).sum() for k in ks])


def class_counts(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(2, C): images of each class, and those among them whose top-1 prediction is right."""
    right = logits.argmax(dim=1) == labels
    return torch.stack(
        [torch.bincount(labels, minlength=num_classes), torch.bincount(labels[right], minlength=num_classes)]
    )


def mean_per_class_recall(counts: torch.Tensor) -> float:
    """Mean over the classes that have images of their top-1 recall (sklearn's balanced accuracy)."""
    present = counts[0] > 0
    return float((counts[1][present].double() / counts[0][present].double()).mean())


def zero_shot_evaluate(
    model: nn.Module,
    model_config: Mapping[str, Any],
    data: str | Sequence[str],
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 64,
    num_workers: int = 0,
    label_key: str = "cls",
    autocast: AutocastFactory = no_autocast,
) -> dict[str, float]:
    """Top-1/top-5 accuracy of ``model`` on an ImageFolder directory or labelled WebDataset shards.

    Every rank of the default process group must call it (it is collective); each evaluates its slice.
    """
    rank, world_size = rank_and_world_size()
    transform = image_transforms(image_size_of(model_config))[1]
    tokenizer = get_tokenizer(context_length_of(model_config))
    if datasets.is_imagefolder(data):
        dataset = datasets.imagefolder_for_rank(data, transform, len(classnames), rank, world_size)
    else:
        dataset = datasets.labelled_webdataset(datasets.expand_shards(data), transform, label_key, rank, world_size)
    device, dtype = placement(model)
    hits = torch.zeros(len(TOP_K), dtype=torch.long, device=device)
    count = torch.zeros(1, dtype=torch.long, device=device)
    # Per class: images, and images whose top-1 is right (mean per-class recall, clip_benchmark's metric).
    per_class = torch.zeros((2, len(classnames)), dtype=torch.long, device=device)
    bad: Counter = Counter()
    with evaluation_mode(model):
        classifier = build_classifier(
            model, tokenizer, classnames, templates, int(model_config["embed_dim"]), autocast=autocast
        )
        for batch, skipped in datasets.loader(dataset, batch_size, num_workers):
            bad.update(skipped)
            if batch is None:
                continue
            images, labels = batch
            labels = torch.as_tensor(labels, device=device)
            if labels.numel() and (labels.min() < 0 or labels.max() >= len(classnames)):
                raise ValueError(
                    f"label {int(labels.max())} is outside the {len(classnames)} class names; "
                    f"the class-name list and the dataset's labels disagree."
                )
            with autocast():
                features = model.encode_image(images.to(device, dtype), normalize=True)
            logits = features.float() @ classifier
            hits += topk_hits(logits, labels)
            count += labels.numel()
            per_class += class_counts(logits, labels, len(classnames))
    totals = all_reduce_sum(torch.cat([hits, count, per_class.flatten()]))
    total = int(totals[len(TOP_K)])
    if total == 0:
        raise ValueError(f"zero-shot data {data!r} yielded no samples.")
    result = {f"top{k}": float(totals[i]) / total for i, k in enumerate(TOP_K)}
    result["mean_per_class_recall"] = mean_per_class_recall(totals[len(TOP_K) + 1 :].reshape(2, -1))
    result["samples"] = total
    result.update(bad_sample_metrics(bad))
    return result
