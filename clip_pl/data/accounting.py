"""Totals of skipped / converted / refilled samples, for logging.

Each batch carries ``batch["bad_samples"]``: what the worker that made it observed since its previous
batch. Summing those over the batches a rank received gives that rank's totals (every worker's
counts arrive exactly once); :func:`sum_over_ranks` adds the ranks together.

    totals = Counter()
    totals.update(batch["bad_samples"])          # in training_step, for every batch
    global_totals = sum_over_ranks(totals)       # e.g. on_train_epoch_end, on every rank (a collective)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import torch.distributed as dist

from clip_pl.distributed import rank_and_world_size


def sum_over_ranks(counts: Mapping[str, int]) -> dict[str, int]:
    """Sum {reason: count} over all ranks (reason sets may differ per rank). Call it on every rank."""
    world_size = rank_and_world_size()[1]
    if world_size == 1:
        return dict(counts)
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, dict(counts))
    total: Counter = Counter()
    for part in gathered:
        total.update(part)
    return dict(total)
