"""Contrastive losses over the global batch, with plain ``torch.distributed`` (no Lightning).

    from clip_pl.loss import ClipLoss, SigLipLoss
    loss = ClipLoss()(image_features, text_features, logit_scale)          # InfoNCE
    loss = SigLipLoss()(image_features, text_features, logit_scale, logit_bias)

Features are L2-normalised and ``logit_scale`` is already exponentiated (open_clip's convention).
Inside an initialised process group each rank passes its local batch of b pairs and gets its
share of the loss over all N = W·b pairs; averaging the ranks' gradients (DDP does) gives exactly
the gradient of the single-process loss on the N concatenated pairs. Outside a process group the
same modules compute the plain single-process loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clip_pl.distributed import rank_and_world_size

# torch 2.14 renamed the tensor collectives (the old names still work, with a warning).
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; the backward sends each rank the sum of all
    ranks' gradients for its own rows (a reduce-scatter), so gradients reach the features'
    owners and the autograd graph stays linear in the batch."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world_size = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        gathered = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
        _all_gather_tensor(gathered, tensor.contiguous())
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            local = grad.new_empty((ctx.rows, *grad.shape[1:]))
            _reduce_scatter_tensor(local, grad)
            return local
        # gloo has no reduce-scatter: an all-reduce then our own slice gives the same numbers.
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, in rank order, differentiable. Identity outside a process group."""
    if rank_and_world_size()[1] == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the global batch, "local loss" formulation.

    Rank r computes its b rows against all N columns in both directions, ``I_r @ T_all.T`` and
    ``T_r @ I_all.T`` (b×N each), with labels ``arange(b) + b·r``. The mean of the ranks' losses
    equals the N×N loss exactly, while memory stays linear in N.
    """

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rank, _ = rank_and_world_size()
        all_image = all_gather_with_grad(image_features)
        all_text = all_gather_with_grad(text_features)
        logits_per_image = logit_scale * image_features @ all_text.T
        logits_per_text = logit_scale * text_features @ all_image.T
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        b = image_features.shape[0]
        labels = torch.arange(b, device=image_features.device) + b * rank
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class _NeighbourExchange(torch.autograd.Function):
    """Send ``tensor`` to rank ``to_rank`` and receive one from ``from_rank``; the backward sends
    the gradient back the way the tensor came."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, to_rank: int, from_rank: int) -> torch.Tensor:
        ctx.to_rank, ctx.from_rank = to_rank, from_rank
        return _exchange(tensor, to_rank, from_rank)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.from_rank, ctx.to_rank), None, None


def _exchange(tensor: torch.Tensor, to_rank: int, from_rank: int) -> torch.Tensor:
    tensor = tensor.contiguous()
    received = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor, to_rank), dist.P2POp(dist.irecv, received, from_rank)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class SigLipLoss(nn.Module):
    """Sigmoid loss (SigLIP, Zhai et al. 2023) with learned bias over the global batch.

    No softmax normalisation couples the rows, so the text blocks travel round a ring: at each of
    W steps a rank scores its b images against one b-sized text block (b×b logits, positives only
    on its own block's diagonal) and passes the block on. No rank ever holds more than b×b logits.
    The loss is normalised by the number of images, as in the paper and open_clip.
    """

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if logit_bias is None:
            raise ValueError("SigLipLoss needs a learned logit_bias: set model.init_logit_bias (e.g. -10).")
        rank, world_size = rank_and_world_size()
        loss = self._block_loss(image_features, text_features, logit_scale, logit_bias, positives=True)
        block = text_features
        for _ in range(world_size - 1):
            block = _NeighbourExchange.apply(block, (rank + 1) % world_size, (rank - 1) % world_size)
            loss = loss + self._block_loss(image_features, block, logit_scale, logit_bias, positives=False)
        return loss

    @staticmethod
    def _block_loss(image_features, text_features, logit_scale, logit_bias, positives: bool):
        logits = logit_scale * image_features @ text_features.T + logit_bias
        signs = -torch.ones_like(logits)
        if positives:
            signs = signs + 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype)
        return -F.logsigmoid(signs * logits).sum() / image_features.shape[0]
