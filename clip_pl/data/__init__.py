"""Data: WebDataset shards → decoded, tokenized batches for CLIP training (see datamodule.py).

Names are imported lazily: ``clip_pl.data.shardspec`` or ``clip_pl.data.tarstream`` alone (evaluation,
the audit, the planner) do not pay for Lightning and the whole pipeline.
"""

from __future__ import annotations

from clip_pl._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "datamodule": ["WebDatasetDataModule", "EpochAwareLoader"],
        "stream": ["WebDatasetStream"],
        "shardspec": ["ShardSet", "resolve_shards"],
        "synthetic": ["SyntheticDataModule"],
        "accounting": ["sum_over_ranks"],
    },
)
