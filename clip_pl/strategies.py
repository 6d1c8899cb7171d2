"""Strategy builders that need Python objects a YAML file cannot name (module classes)."""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy
from open_clip.modified_resnet import Bottleneck
from open_clip.transformer import ResidualAttentionBlock

# The repeated blocks of both towers: each becomes one FSDP unit (and one checkpointed region).
TOWER_BLOCKS = {ResidualAttentionBlock, Bottleneck}


def fsdp_strategy(sharding_strategy: str = "FULL_SHARD", state_dict_type: str = "full",
                  activation_checkpointing: bool = False, process_group_backend: str | None = None,
                  **kwargs) -> FSDPStrategy:
    return FSDPStrategy(
        auto_wrap_policy=TOWER_BLOCKS,
        activation_checkpointing_policy=TOWER_BLOCKS if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        process_group_backend=process_group_backend,
        **kwargs,
    )
