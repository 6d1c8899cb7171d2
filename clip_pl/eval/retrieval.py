"""Image↔text retrieval recall@k on an image-caption WebDataset, in bounded memory.

A query's rank is the number of gallery items scoring strictly higher than its best positive
(image→text: any of the image's captions; text→image: the caption's own image); recall@k is the
share of queries with rank < k. Similarities are computed ``chunk_size`` queries at a time, so
5 000 images × 25 000 captions needs chunk_size × 25 000 floats, not 125 M. With several ranks,
each encodes its slice, the embeddings are gathered (padded, exact for uneven slices), each rank
scores its own queries against the full gallery and the hit counts are summed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from clip_pl.distributed import rank_and_world_size
from clip_pl.eval import datasets
from clip_pl.eval.common import AutocastFactory, bad_sample_metrics, evaluation_mode, no_autocast, placement
from clip_pl.eval.distributed import all_reduce_sum, gather_rows
from clip_pl.model import context_length_of, get_tokenizer, image_size_of, image_transforms

RECALL_K = (1, 5, 10)


def image_to_text_hits(
    queries: torch.Tensor,
    query_ids: torch.Tensor,
    texts: torch.Tensor,
    text_owner: torch.Tensor,
    ks: Sequence[int],
    chunk_size: int,
) -> tuple[torch.Tensor, int]:
    """(hits per k, number of queries that have a caption); images without captions are not queries."""
    hits = torch.zeros(len(ks), dtype=torch.long, device=queries.device)
    answerable = 0
    for start in range(0, queries.shape[0], chunk_size):
        scores = queries[start : start + chunk_size] @ texts.T
        positive = text_owner[None, :] == query_ids[start : start + chunk_size, None]
        best = scores.masked_fill(~positive, float("-inf")).max(dim=1).values
        rank = (scores > best[:, None]).sum(dim=1)
        has_caption = positive.any(dim=1)
        answerable += int(has_caption.sum())
        hits += torch.stack([((rank < k) & has_caption).sum() for k in ks])
    return hits, answerable


def text_to_image_hits(
    queries: torch.Tensor, owner: torch.Tensor, images: torch.Tensor, ks: Sequence[int], chunk_size: int
) -> torch.Tensor:
    hits = torch.zeros(len(ks), dtype=torch.long, device=queries.device)
    for start in range(0, queries.shape[0], chunk_size):
        scores = queries[start : start + chunk_size] @ images.T
        positive = scores.gather(1, owner[start : start + chunk_size, None])
        rank = (scores > positive).sum(dim=1)
        hits += torch.stack([(rank < k).sum() for k in ks])
    return hits


def recall_metrics(
    i2t_hits: torch.Tensor, answerable: int, t2i_hits: torch.Tensor, captions: int, ks: Sequence[int]
) -> dict[str, float]:
    if answerable == 0 or captions == 0:
        raise ValueError("retrieval needs at least one image with a caption; the data yielded none.")
    result = {f"image_to_text_R@{k}": float(i2t_hits[i]) / answerable for i, k in enumerate(ks)}
    result.update({f"text_to_image_R@{k}": float(t2i_hits[i]) / captions for i, k in enumerate(ks)})
    return result


def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = RECALL_K,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@k from embeddings (one process): text j describes image text_to_image[j]."""
    image_ids = torch.arange(image_features.shape[0], device=image_features.device)
    i2t, answerable = image_to_text_hits(image_features, image_ids, text_features, text_to_image, ks, chunk_size)
    t2i = text_to_image_hits(text_features, text_to_image, image_features, ks, chunk_size)
    return recall_metrics(i2t, answerable, t2i, text_features.shape[0], ks)


def _encode_slice(
    model: nn.Module, loader, autocast: AutocastFactory, bad: Counter
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device, dtype = placement(model)
    images, texts, owners, seen = [], [], [], 0
    for batch, skipped in loader:
        bad.update(skipped)
        if batch is None:
            continue
        batch_images, tokens, owner = batch
        with autocast():
            images.append(model.encode_image(batch_images.to(device, dtype), normalize=True).float())
            if len(tokens):
                texts.append(model.encode_text(tokens.to(device), normalize=True).float())
        owners.append(owner.to(device) + seen)
        seen += batch_images.shape[0]
    if not images:  # this rank's slice is empty (tiny sets, many ranks): it still joins the collectives
        return (
            torch.zeros((0, 0), device=device),
            torch.zeros((0, 0), device=device),
            torch.zeros(0, dtype=torch.long, device=device),
        )
    texts_t = torch.cat(texts) if texts else images[0].new_zeros((0, images[0].shape[1]))
    return torch.cat(images), texts_t, torch.cat(owners)


def retrieval_evaluate(
    model: nn.Module,
    model_config: Mapping[str, Any],
    data: str | Sequence[str],
    batch_size: int = 64,
    num_workers: int = 0,
    text_key: str = "txt",
    caption_separator: str | None = "\n",
    ks: Sequence[int] = RECALL_K,
    chunk_size: int = 1024,
    autocast: AutocastFactory = no_autocast,
) -> dict[str, float]:
    """Recall@k both ways. Every rank of the default process group must call it (it is collective)."""
    rank, world_size = rank_and_world_size()
    ks = tuple(int(k) for k in ks)
    transform = image_transforms(image_size_of(model_config))[1]
    tokenizer = get_tokenizer(context_length_of(model_config))
    dataset = datasets.captioned_webdataset(
        datasets.expand_shards(data), transform, tokenizer, text_key, caption_separator, rank, world_size
    )
    embed_dim = int(model_config["embed_dim"])
    with evaluation_mode(model):
        local = datasets.loader(dataset, batch_size, num_workers, collate_fn=datasets.collate_captioned)
        bad: Counter = Counter()
        images, texts, owner = _encode_slice(model, local, autocast, bad)
    images, texts = images.reshape(-1, embed_dim), texts.reshape(-1, embed_dim)
    device = images.device
    counts = gather_rows(torch.tensor([[images.shape[0]]], dtype=torch.long, device=device)).flatten()
    offset = int(counts[:rank].sum())
    owner = owner + offset
    all_images, all_texts, all_owner = gather_rows(images), gather_rows(texts), gather_rows(owner)
    query_ids = torch.arange(offset, offset + images.shape[0], device=device)
    i2t, answerable = image_to_text_hits(images, query_ids, all_texts, all_owner, ks, chunk_size)
    t2i = text_to_image_hits(texts, owner, all_images, ks, chunk_size)
    totals = all_reduce_sum(torch.cat([i2t, t2i, torch.tensor([answerable, texts.shape[0]], device=device)]))
    n = len(ks)
    result = recall_metrics(totals[:n], int(totals[2 * n]), totals[n : 2 * n], int(totals[2 * n + 1]), ks)
    result.update(
        images=all_images.shape[0],
        captions=all_texts.shape[0],
        images_without_caption=all_images.shape[0] - int(totals[2 * n]),
    )
    result.update(bad_sample_metrics(bad))
    return result
