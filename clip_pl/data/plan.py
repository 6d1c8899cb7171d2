"""The exact-epoch plan without reading data: which samples each rank and worker gets.

    python -m clip_pl.data.plan --shards 41456 --samples-per-shard 10000 --ranks 256 --workers 8 --batch 128

It runs the loader's own code (:meth:`WebDatasetStream.epoch_order` and :func:`worker_slice`) over a
manifest of shard sizes, so what it prints is what a job of that shape will do: the shard order
of the epoch, each worker's slice of positions, the shards each worker opens, the batches per rank
and the samples the epoch leaves out. tests/test_scale_plan.py checks it at LAION-400M scale.
"""

from __future__ import annotations

import argparse
import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from clip_pl.data.shardspec import Shard, ShardSet
from clip_pl.data.stream import WebDatasetStream, worker_batches, worker_slice
from clip_pl.model import image_transforms


@dataclass(frozen=True)
class WorkerPlan:
    rank: int
    worker: int
    start: int  # positions [start, stop) of the epoch's order
    stop: int
    batches: int
    first_shard: int  # index into the epoch's shard order, and the offset in it
    first_offset: int
    last_shard: int
    shards_opened: int


@dataclass(frozen=True)
class EpochPlan:
    order: list[int]  # manifest index of each shard in the epoch's order
    workers: list[WorkerPlan]
    batches_per_rank: int
    used: int  # positions trained this epoch
    left_out: int  # the remainder: samples of the epoch's order not trained this epoch


# The plan reads no image: the stream only needs a transform it accepts (the loaders' contract).
PLAN_IMAGE_SIZE = 32


def epoch_plan(
    sizes: Sequence[int], world_size: int, num_workers: int, batch_size: int, seed: int = 0, epoch: int = 0
) -> EpochPlan:
    shards = ShardSet(
        shards=tuple(Shard(url=f"{i:05d}.tar", size=int(n), source=0) for i, n in enumerate(sizes)), weights=(1.0,)
    )
    total = sum(int(n) for n in sizes)
    batches_per_rank = total // (world_size * batch_size)
    stream = WebDatasetStream(
        shards,
        batch_size=batch_size,
        batches_per_rank=batches_per_rank,
        rank=0,
        world_size=world_size,
        transform=image_transforms(PLAN_IMAGE_SIZE)[1],
        tokenizer=lambda x: x,
        image_size=PLAN_IMAGE_SIZE,
        seed=seed,
        epoch_samples=total,
    )
    order = [int(s.url[:5]) for s in stream.epoch_order(epoch)]
    ends = list(accumulate(int(sizes[i]) for i in order))  # position after each shard of the order

    def locate(position: int) -> tuple[int, int]:
        index = bisect.bisect_right(ends, position)
        return index, position - (ends[index - 1] if index else 0)

    plans = []
    for rank in range(world_size):
        for worker in range(num_workers):
            start, stop = worker_slice(rank, worker, num_workers, batches_per_rank, batch_size)
            batches = worker_batches(batches_per_rank, num_workers, worker)
            if stop > start:
                first, offset = locate(start)
                last, _ = locate(stop - 1)
            else:
                first = offset = last = -1
            plans.append(
                WorkerPlan(
                    rank, worker, start, stop, batches, first, offset, last, last - first + 1 if stop > start else 0
                )
            )
    used = world_size * batches_per_rank * batch_size
    return EpochPlan(order=order, workers=plans, batches_per_rank=batches_per_rank, used=used, left_out=total - used)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clip_pl.data.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, required=True)
    p.add_argument("--samples-per-shard", type=int, default=10_000)
    p.add_argument("--ranks", type=int, required=True)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--batch", type=int, required=True, help="per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epoch", type=int, default=0)
    args = p.parse_args(argv)
    plan = epoch_plan(
        [args.samples_per_shard] * args.shards, args.ranks, args.workers, args.batch, args.seed, args.epoch
    )
    opened = [w.shards_opened for w in plan.workers]
    print(
        f"{args.ranks} ranks × {args.workers} workers, batch {args.batch}/rank: {plan.batches_per_rank} steps per "
        f"epoch, {plan.used} samples trained, {plan.left_out} left out; shards opened per worker "
        f"{min(opened)}–{max(opened)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
