"""Per-step learning-rate schedules (multipliers of the base LR), as Hydra ``_partial_`` targets.

    scheduler = warmup_cosine(optimizer, total_steps=10_000, warmup_steps=500)

The module calls the partial with the optimizer and the run's total optimizer steps, and steps it
every optimizer step (Lightning ``interval: step``), so the schedule is a pure function of the
global step and resumes exactly from a checkpoint.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _check(total_steps: int, warmup_steps: int) -> None:
    # warmup_steps >= total_steps is refused earlier, by clip_pl.config_checks, where the message
    # can name the config keys; a fast_dev_run legitimately stops inside the warmup.
    if warmup_steps < 0 or total_steps <= 0:
        raise ValueError(f"scheduler: need total_steps > 0 and warmup_steps >= 0 (got {total_steps}, {warmup_steps}).")


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps  # linear from base_lr/warmup to base_lr


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warmup, then cosine decay to ``min_lr_ratio``·base_lr at ``total_steps``."""
    _check(total_steps, warmup_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, multiplier)


def warmup_const(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """Linear warmup, then constant."""
    _check(total_steps, warmup_steps)
    return LambdaLR(optimizer, lambda step: _warmup(step, warmup_steps) if step < warmup_steps else 1.0)


def warmup_const_cooldown(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    cooldown_steps: int = 0,
    cooldown_power: float = 1.0,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Warmup, constant, then a cooldown over the last ``cooldown_steps`` (power 1: linear,
    0.5: the "1-sqrt" shape of Hägele et al. 2024) down to ``min_lr_ratio``."""
    _check(total_steps, warmup_steps)
    if cooldown_steps < 0:
        raise ValueError(f"scheduler.cooldown_steps={cooldown_steps} must be >= 0.")
    cooldown_start = total_steps - cooldown_steps

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        if step < cooldown_start or cooldown_steps == 0:
            return 1.0
        progress = min(1.0, (step - cooldown_start) / cooldown_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress**cooldown_power)

    return LambdaLR(optimizer, multiplier)
