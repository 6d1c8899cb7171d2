"""Data: WebDataset shards → decoded, tokenized batches for CLIP training (see datamodule.py).

Names are imported lazily: ``clip_pl.data.shardspec`` or ``clip_pl.data.tarstream`` alone (evaluation,
the audit, the planner) do not pay for Lightning and the whole pipeline.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "WebDatasetDataModule": "clip_pl.data.datamodule",
    "EpochAwareLoader": "clip_pl.data.datamodule",
    "WebDatasetStream": "clip_pl.data.stream",
    "ShardSet": "clip_pl.data.shardspec",
    "resolve_shards": "clip_pl.data.shardspec",
    "SyntheticDataModule": "clip_pl.data.synthetic",
    "sum_over_ranks": "clip_pl.data.accounting",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clip_pl.data' has no attribute {name!r}")
