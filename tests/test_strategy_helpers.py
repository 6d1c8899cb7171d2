"""Small strategy helpers, on one process: which strategy is DeepSpeed, and the parameter-copy step."""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from torch import nn

from clip_pl.checkpointing import writes_folders
from clip_pl.strategies import is_deepspeed, return_parameter_copies


class Zero(DeepSpeedStrategy):  # a DeepSpeed strategy whose name does not say so
    pass


class NotDeepSpeedAtAll(DDPStrategy):  # and the other way round
    pass


def _bare(cls):
    return object.__new__(cls)  # no __init__: nothing is set up, only the type matters


def test_deepspeed_is_decided_by_type_not_by_name():
    assert is_deepspeed(_bare(Zero)) and writes_folders(_bare(Zero))
    assert not is_deepspeed(_bare(NotDeepSpeedAtAll)) and not writes_folders(_bare(NotDeepSpeedAtAll))


class ReturnsItsBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([1.5]))

    def forward(self, x):
        return x * 2, self.bias


def test_forward_returns_a_copy_of_a_parameter_that_still_gets_gradients():
    model = ReturnsItsBias()
    return_parameter_copies(model)
    return_parameter_copies(model)  # a second prepare_model registers nothing more
    assert len(model._forward_hooks) == 1
    _, bias = model(torch.ones(1))
    assert not isinstance(bias, nn.Parameter) and bias.data_ptr() != model.bias.data_ptr()
    bias.sum().backward()
    assert model.bias.grad is not None and float(model.bias.grad) == 1.0
