"""A worker's batch built row by row: each image copied into the batch as soon as it is made.

Why not collect the images and stack them at the end: a batch of 128 decoded 256-px images is ~25 MB,
more than a core's caches, so a copy at the end reads every image back from memory. Copied right after
its decode or resize, an image is still in cache; on 256-px shards this took the batch copy from about
36 to 20 µs a sample, ~5 % of a worker's time (``benchmarks/loader_bench.py --per-core``).

Where: inside a DataLoader worker, straight into shared memory, as torch's ``default_collate`` does.
A batch in ordinary memory is copied into shared memory again when the worker sends it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.data import get_worker_info


def batch_tensor(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor, in shared memory when called in a DataLoader worker."""
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(int(side) for side in shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(tuple(shape))


class StackedRows:
    """``torch.stack`` of ``rows`` equally shaped tensors, filled one :meth:`add` at a time."""

    def __init__(self, rows: int) -> None:
        self.rows, self.added, self.batch = rows, 0, None

    def add(self, row: torch.Tensor) -> None:
        if self.batch is None:
            self.batch = batch_tensor((self.rows, *row.shape), row.dtype)
        if self.added == self.rows:
            raise ValueError(f"a batch of {self.rows} rows got one more")
        if tuple(row.shape) != tuple(self.batch.shape[1:]):
            raise ValueError(
                f"rows of one batch must have one shape: {tuple(self.batch.shape[1:])} then {tuple(row.shape)}"
            )
        self.batch[self.added].copy_(row)
        self.added += 1

    def result(self) -> torch.Tensor:
        if self.added != self.rows:
            raise ValueError(f"a batch of {self.rows} rows got {self.added}")
        return self.batch
