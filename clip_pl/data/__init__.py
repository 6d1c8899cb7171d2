"""Data: WebDataset shards → decoded, tokenized batches for CLIP training (see datamodule.py)."""

from .accounting import sum_over_ranks
from .datamodule import EpochAwareLoader, WebDatasetDataModule
from .shardspec import ShardSet, resolve_shards
from .stream import WebDatasetStream
from .synthetic import SyntheticDataModule

__all__ = ["WebDatasetDataModule", "EpochAwareLoader", "WebDatasetStream", "ShardSet", "resolve_shards",
           "SyntheticDataModule", "sum_over_ranks"]
