"""What zero-shot and retrieval evaluation share: eval mode, device/dtype, the autocast context, and
the bad-sample counts."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from clip_pl.data.accounting import sum_over_ranks

AutocastFactory = Callable[[], contextlib.AbstractContextManager]


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """eval() + no_grad for the duration, then the model's previous train/eval mode again."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where images must go: the model's device, and its dtype (bf16 under bf16-true training)."""
    param = next(model.parameters())
    return param.device, param.dtype


def no_autocast() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def bad_sample_metrics(counts: Mapping[str, int]) -> dict[str, int]:
    """``bad_samples/<reason>``: what the loaders skipped or converted, summed over ranks (a collective).
    Nothing at all for clean data, so a clean result has only its metrics."""
    return {f"bad_samples/{reason}": int(n) for reason, n in sorted(sum_over_ranks(counts).items())}
