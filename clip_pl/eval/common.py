"""What zero-shot and retrieval evaluation share: eval mode, device/dtype, the autocast context."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator

import torch
from torch import nn

AutocastFactory = Callable[[], ContextManager]


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


def no_autocast() -> ContextManager:
    return contextlib.nullcontext()
