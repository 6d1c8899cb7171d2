"""The few collectives evaluation needs, exact for uneven shards, on gloo and NCCL alike.

Every rank evaluates its own slice with no collective inside the loop (a slow rank never
holds the others hostage mid-loop), then joins exactly these calls once at the end.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from clip_pl.distributed import rank_and_world_size


def _comm_device(tensor: torch.Tensor) -> torch.device:
    # gloo works on CPU tensors; NCCL only on CUDA ones.
    return torch.device("cpu") if dist.get_backend() == "gloo" else tensor.device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (returns a new tensor; the input is untouched)."""
    if rank_and_world_size()[1] == 1:
        return tensor.clone()
    out = tensor.detach().to(_comm_device(tensor)).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows in rank order; ranks may hold different row counts (even 0).

    all_gather needs equal shapes, so each rank pads to the largest count and the padding is cut
    off again using the gathered counts.
    """
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        return tensor
    device = _comm_device(tensor)
    local = tensor.detach().to(device).contiguous()
    count = torch.tensor([local.shape[0]], dtype=torch.long, device=device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    counts_list = [int(c) for c in counts]
    largest = max(counts_list)
    if largest == 0:
        return tensor[:0]
    padded = local.new_zeros((largest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, counts_list)]).to(tensor.device)


def contiguous_slice(total: int, rank: int, world_size: int) -> slice:
    """Rank's block of range(total): blocks differ by at most one item and keep the order."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))
