"""Where this process stands in the default ``torch.distributed`` process group."""

from __future__ import annotations

import torch.distributed as dist


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
