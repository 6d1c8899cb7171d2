"""The LightningModule: weight-decay groups, the temperature cap, schedules, and GradCache-style
chunking that keeps the contrastive batch global (single process and 2 gloo ranks)."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from clip_pl.loss import ClipLoss, SigLipLoss
from clip_pl.model import resolve_model_config
from clip_pl.module import CLIPModule
from clip_pl.schedule import warmup_const, warmup_const_cooldown, warmup_cosine
from tests.distributed import run_distributed
from tests.test_loss import TINY, make_batch


def assert_grads_close(actual: dict, expected: dict) -> None:
    """Float32 sums in another order differ by ~1e-7 of the gradient's scale, no more."""
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-4, atol=1e-6 * max(1.0, grad.abs().max().item()),
                                   msg=name)


def make_module(chunks: int = 1, loss=None, **config) -> CLIPModule:
    torch.manual_seed(0)
    return CLIPModule(model_config=resolve_model_config(arch_config=TINY, **config), loss=loss or ClipLoss(),
                      optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.2),
                      grad_cache_chunks=chunks)


def grads_of(module: CLIPModule, images, texts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad()
    loss = module.contrastive_loss({"image": images, "text": texts})
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_weight_decay_groups_exclude_biases_norms_and_temperature():
    module = make_module()
    decay, no_decay = module.parameter_groups()
    names = {id(p): n for n, p in module.model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay  # AdamW's own wd applies
    assert "logit_scale" in exempt and "visual.class_embedding" in exempt
    assert all(n.endswith("bias") or "ln_" in n or n in ("logit_scale", "visual.class_embedding") or
               module.model.get_parameter(n).ndim < 2 for n in exempt)
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in decayed
    assert "transformer.resblocks.0.mlp.c_fc.weight" in decayed
    assert not any(n.endswith("bias") or "ln_" in n for n in decayed)
    assert decayed | exempt == set(names.values())
    optimizer = module.optimizer_factory(params=module.parameter_groups())
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.2, 0.0]


def test_temperature_starts_at_one_over_007_and_is_capped_at_100():
    module = make_module()
    assert module.logit_scale().item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        module.model.logit_scale.fill_(math.log(500.0))
    assert module.logit_scale().item() == pytest.approx(100.0)
    images, texts = make_batch(4)
    _, grads = grads_of(module, images, texts)
    # Beyond the cap the temperature gets no gradient, so no optimizer (nor DeepSpeed's fp32
    # master copy) can push the effective scale past 100.
    assert grads["model.logit_scale"].item() == 0.0


@pytest.mark.parametrize("loss", [ClipLoss(), SigLipLoss()], ids=["clip", "siglip"])
def test_grad_cache_chunks_give_the_gradients_of_the_whole_batch(loss):
    extra = {"init_logit_bias": -5.0} if isinstance(loss, SigLipLoss) else {}
    images, texts = make_batch(8)
    ref_loss, ref_grads = grads_of(make_module(1, loss, **extra), images, texts)
    loss_k, grads_k = grads_of(make_module(4, loss, **extra), images, texts)
    torch.testing.assert_close(loss_k, ref_loss)
    assert_grads_close(grads_k, ref_grads)


class _LossOf(torch.nn.Module):
    """What DDP wraps: a forward that is the module's contrastive loss."""

    def __init__(self, module: CLIPModule):
        super().__init__()
        self.module = module

    def forward(self, images, texts):
        return self.module.contrastive_loss({"image": images, "text": texts})


def _chunked_rank(rank: int, world_size: int):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    images, texts = make_batch(8)
    rows = slice(rank * 4, (rank + 1) * 4)
    module = make_module(2)
    ddp = DistributedDataParallel(_LossOf(module))  # gloo: DDP averages the gradients over the ranks
    loss = ddp(images[rows], texts[rows])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    loss = loss.detach()
    dist.all_reduce(loss)  # the logged global loss: the mean of the ranks' shares
    return loss / world_size, grads


def test_grad_cache_across_ranks_equals_one_step_on_the_k_times_larger_global_batch():
    images, texts = make_batch(8)
    ref_loss, ref_grads = grads_of(make_module(1), images, texts)
    for loss, grads in run_distributed(_chunked_rank, 2):
        torch.testing.assert_close(loss, ref_loss)
        assert_grads_close(grads, ref_grads)


def lrs(make_scheduler, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_schedules_warm_up_linearly_then_follow_their_shape():
    cosine = lrs(lambda o: warmup_cosine(o, total_steps=100, warmup_steps=10, min_lr_ratio=0.1), 101)
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == pytest.approx(1.0)
    assert cosine[55] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6) and cosine[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cosine[9:], cosine[10:]))
    const = lrs(lambda o: warmup_const(o, total_steps=50, warmup_steps=5), 50)
    assert const[4] == pytest.approx(1.0) and set(const[4:]) == {1.0}
    cool = lrs(lambda o: warmup_const_cooldown(o, total_steps=100, warmup_steps=10, cooldown_steps=20), 101)
    assert cool[79] == 1.0 and cool[90] == pytest.approx(0.5) and cool[100] == pytest.approx(0.0)
