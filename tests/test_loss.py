"""The global-batch losses: single-process maths, open_clip parity, and multi-process equivalence
(forward and backward) with the single-process loss on the concatenated batch, over real gloo."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from clip_pl.loss import ClipLoss, SigLipLoss
from clip_pl.model import build_clip, resolve_model_config
from tests.support.distributed import run_distributed
from tests.support.towers import TINY, make_batch

# Compares two computations of the same numbers: also run under ATEN_CPU_CAPABILITY=avx2 in CI (.ci/run).
pytestmark = pytest.mark.numerics

LOSSES = {"clip": ClipLoss, "siglip": SigLipLoss}


def make_model(loss_name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"init_logit_bias": -5.0} if loss_name == "siglip" else {}
    # float64: the two computations reduce in another order, which in float32 moves near-zero entries of
    # large cancelling sums by ~1e-7 of the tensor's scale, and which order depends on the CPU's kernels.
    return build_clip(resolve_model_config(arch_config=TINY, **extra)).double()


def loss_and_grads(model, loss_fn, images, texts):
    images = images.double()
    image_features = F.normalize(model.encode_image(images), dim=-1)
    text_features = F.normalize(model.encode_text(texts), dim=-1)
    loss = loss_fn(image_features, text_features, model.logit_scale.exp(), model.logit_bias)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _distributed_step(rank: int, world_size: int, loss_name: str, b: int):
    """One rank: its b-row slice, its local loss, DDP-style averaged gradients."""
    import torch.distributed as dist

    model = make_model(loss_name)
    images, texts = make_batch(world_size * b)
    rows = slice(rank * b, (rank + 1) * b)
    loss, grads = loss_and_grads(model, LOSSES[loss_name](), images[rows], texts[rows])
    dist.all_reduce(loss)
    for g in grads.values():  # exactly what DDP does to gradients: average over ranks
        dist.all_reduce(g)
        g /= world_size
    return loss / world_size, grads


@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_distributed_loss_and_gradients_equal_single_process_global_batch(loss_name, world_size):
    b = 4
    model = make_model(loss_name)
    images, texts = make_batch(world_size * b)
    ref_loss, ref_grads = loss_and_grads(model, LOSSES[loss_name](), images, texts)

    results = run_distributed(_distributed_step, world_size, args=(loss_name, b))
    for loss, grads in results:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
        assert grads.keys() == ref_grads.keys()
        for name in ref_grads:  # float64 reordering noise is ~1e-16 of the scale: 1e-10 of the largest entry
            scale = ref_grads[name].abs().max().item()
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=1e-10 * scale, msg=name)
    assert "logit_scale" in ref_grads and ref_grads["logit_scale"].abs() > 0
    if loss_name == "siglip":
        assert ref_grads["logit_bias"].abs() > 0


def test_clip_loss_is_symmetric_cross_entropy_over_the_full_matrix():
    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 5, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(6, 5, generator=gen), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.T
    labels = torch.arange(6)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(ClipLoss()(img, txt, scale), expected)


def test_siglip_loss_matches_the_paper_formula():
    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(5, 4, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(5, 4, generator=gen), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-3.0)
    z = 2 * torch.eye(5) - 1
    expected = -F.logsigmoid(z * (scale * img @ txt.T + bias)).sum() / 5
    torch.testing.assert_close(SigLipLoss()(img, txt, scale, bias), expected)
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(img, txt, scale)


def _open_clip_parity(rank: int, world_size: int):
    from open_clip.loss import ClipLoss as OpenClipLoss

    gen = torch.Generator().manual_seed(7)
    img = F.normalize(torch.randn(world_size * 4, 6, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(world_size * 4, 6, generator=gen), dim=-1)
    rows = slice(rank * 4, (rank + 1) * 4)
    out = {}
    for name, fn in {
        "ours": ClipLoss(),
        "open_clip": OpenClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size),
    }.items():
        i, t = img[rows].clone().requires_grad_(), txt[rows].clone().requires_grad_()
        scale = torch.tensor(14.0, requires_grad=True)
        loss = fn(i, t, scale)
        loss.backward()
        out[name] = (loss.detach(), i.grad, t.grad, scale.grad)
    return out


def test_clip_loss_matches_open_clip_local_loss_with_gathered_gradients():
    for result in run_distributed(_open_clip_parity, 2):
        for ours, theirs in zip(result["ours"], result["open_clip"]):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest: tuple[int, tuple] = (0, ())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest[0]:
                self.largest = (t.numel(), tuple(t.shape))
        return out


def _largest_loss_tensor(rank: int, world_size: int, loss_name: str, b: int, dim: int):
    gen = torch.Generator().manual_seed(rank)
    img = F.normalize(torch.randn(b, dim, generator=gen), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(b, dim, generator=gen), dim=-1).requires_grad_()
    with LargestTensor() as probe:
        loss = LOSSES[loss_name]()(img, txt, torch.tensor(10.0), torch.tensor(-5.0))
        loss.backward()
    return probe.largest


@pytest.mark.slow  # multi-process or subprocess: > ~10 s on 2 cores (make test-quick leaves it out)
def test_largest_loss_tensor_is_b_by_n_for_infonce_and_b_by_b_for_sigmoid():
    b, dim, world_size = 16, 4, 2  # dim < b, so the features never outgrow the logits
    n = b * world_size
    clip_largest = run_distributed(_largest_loss_tensor, world_size, args=("clip", b, dim))
    assert all(largest == (b * n, (b, n)) for largest in clip_largest), clip_largest
    siglip_largest = run_distributed(_largest_loss_tensor, world_size, args=("siglip", b, dim))
    assert all(largest == (b * b, (b, b)) for largest in siglip_largest), siglip_largest
