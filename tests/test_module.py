"""The LightningModule: weight-decay groups, the temperature cap, schedules, and GradCache-style
chunking that keeps the contrastive batch global (single process and 2 gloo ranks)."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from clip_pl.loss import ClipLoss, SigLipLoss
from clip_pl.model import resolve_model_config
from clip_pl.module import CLIPModule, cap_logit_scale
from clip_pl.schedule import warmup_const, warmup_const_cooldown, warmup_cosine
from tests.support.distributed import run_distributed
from tests.support.towers import TINY, make_batch

# Compares two computations of the same numbers: also run under ATEN_CPU_CAPABILITY=avx2 in CI (.ci/run).
pytestmark = pytest.mark.numerics


def assert_grads_close(actual: dict, expected: dict) -> None:
    """Float32 sums in another order differ by ~1e-7 of the gradient's scale, no more."""
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(
            actual[name], grad, rtol=1e-4, atol=1e-6 * max(1.0, grad.abs().max().item()), msg=name
        )


def make_module(chunks: int = 1, loss=None, arch_config=TINY, **config) -> CLIPModule:
    torch.manual_seed(0)
    return CLIPModule(
        model_config=resolve_model_config(arch_config=arch_config, **config),
        loss=loss or ClipLoss(),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.2),
        grad_cache_chunks=chunks,
    )


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
    assert all(
        n.endswith("bias")
        or "ln_" in n
        or n in ("logit_scale", "visual.class_embedding")
        or module.model.get_parameter(n).ndim < 2
        for n in exempt
    )
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in decayed
    assert "transformer.resblocks.0.mlp.c_fc.weight" in decayed
    assert not any(n.endswith("bias") or "ln_" in n for n in decayed)
    assert decayed | exempt == set(names.values())
    optimizer = module.optimizer_factory(params=module.parameter_groups())
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.2, 0.0]


def test_temperature_starts_at_one_over_007_and_is_capped_at_100():
    module = make_module()
    assert module.temperature() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        module.model.logit_scale.fill_(math.log(500.0))
    assert module.temperature() == pytest.approx(100.0)
    seen = []
    module.loss.register_forward_pre_hook(lambda _, args: seen.append(args[2].item()))
    module.contrastive_loss(dict(zip(("image", "text"), make_batch(4))))
    assert seen == [pytest.approx(100.0)]  # what the loss multiplies the logits by


def test_above_the_cap_only_gradients_that_lower_the_temperature_pass():
    scale = torch.tensor([150.0, 150.0, 50.0], requires_grad=True)
    capped = cap_logit_scale(scale, 100.0)
    assert capped.tolist() == [100.0, 100.0, 50.0]
    capped.backward(torch.tensor([-1.0, 1.0, -1.0]))  # descent raises, lowers, raises
    # Raising past the cap is blocked; lowering (and anything below the cap) passes unchanged.
    assert scale.grad.tolist() == [0.0, 1.0, -1.0]


def test_a_temperature_pushed_to_the_cap_comes_back_down_when_the_gradient_turns():
    """The latch the old cap had: 100 steps that push the temperature up, then 100 that pull it
    down. A plain clamp (zero gradient above the cap) stays at 100 for good; this one returns."""
    raw = torch.nn.Parameter(torch.tensor(math.log(50.0)))
    optimizer = torch.optim.AdamW([raw], lr=0.05, weight_decay=0.0)
    history = []
    for step in range(200):
        direction = -1.0 if step < 100 else 1.0  # the loss first wants a larger temperature, then smaller
        optimizer.zero_grad()
        (direction * cap_logit_scale(raw.exp(), 100.0)).backward()
        optimizer.step()
        history.append(min(raw.exp().item(), 100.0))
    assert history[99] == pytest.approx(100.0)
    assert history[-1] < 60.0


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


def test_grad_cache_recompute_does_not_update_batchnorm_statistics_twice():
    """ResNet towers: each chunk's forward updates the running statistics once, as without chunks;
    the recompute in the backward must not update them again."""
    resnet = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
        "text_cfg": TINY["text_cfg"],
    }
    module = make_module(2, arch_config=resnet)
    reference = copy.deepcopy(module.model)
    images, texts = torch.randn(8, 3, 32, 32), make_batch(8)[1]
    module.contrastive_loss({"image": images, "text": texts}).backward()
    with torch.no_grad():  # the forward passes alone, chunk by chunk
        for i, t in zip(images.chunk(2), texts.chunk(2)):
            reference(i, t)
    stats = [(n, b) for n, b in module.model.named_buffers() if "running_" in n or "num_batches" in n]
    assert stats
    expected = dict(reference.named_buffers())
    for name, buffer in stats:
        torch.testing.assert_close(buffer, expected[name], msg=name)
