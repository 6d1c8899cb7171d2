"""The epoch plan at 256 ranks × 8 workers over a LAION-400M-shaped manifest, without reading data.

    pytest tests/test_scale_plan.py          # a few seconds

41 456 shards of about 10 000 samples (uneven, as img2dataset leaves them), global batch 32 768:
the loader's own code (epoch order, worker slices) must give every rank the same number of full
batches, and every sample of the epoch to exactly one worker, apart from a remainder smaller than
one global batch.
"""

from __future__ import annotations

import random

from clip_pl.data.plan import epoch_plan

SHARDS, RANKS, WORKERS, BATCH = 41_456, 256, 8, 128


def _laion_sizes() -> list[int]:
    rng = random.Random(0)
    return [rng.randint(9_000, 10_500) for _ in range(SHARDS)]  # failed downloads make shards uneven


def test_laion400m_on_256_ranks_every_sample_once_equal_batches():
    sizes = _laion_sizes()
    total = sum(sizes)
    plan = epoch_plan(sizes, RANKS, WORKERS, BATCH, seed=0, epoch=3)

    # The epoch's shard order is a permutation of the manifest (each shard once), reshuffled per epoch.
    assert sorted(plan.order) == list(range(SHARDS))
    assert plan.order != epoch_plan(sizes, RANKS, WORKERS, BATCH, seed=0, epoch=4).order

    # Equal full batches on every rank: the same count, summed over its workers.
    per_rank = {}
    for w in plan.workers:
        per_rank[w.rank] = per_rank.get(w.rank, 0) + w.batches
        assert w.stop - w.start == w.batches * BATCH
    assert set(per_rank.values()) == {plan.batches_per_rank} and len(per_rank) == RANKS
    assert plan.batches_per_rank == total // (RANKS * BATCH)

    # Every sample once: the workers' slices tile [0, used) without gap or overlap …
    slices = sorted((w.start, w.stop) for w in plan.workers)
    assert slices[0][0] == 0 and slices[-1][1] == plan.used
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
    # … and what is left out is less than one global batch.
    assert plan.left_out == total - plan.used and 0 <= plan.left_out < RANKS * BATCH

    # Each worker opens about shards / (ranks × workers) + 1 shards: no worker reads everything.
    assert max(w.shards_opened for w in plan.workers) <= SHARDS // (RANKS * WORKERS) + 2


def test_the_plan_is_what_the_loader_reads(tmp_path):
    """On a small manifest, the plan's slices are the keys the real loader yields per rank/worker."""
    import torch

    from clip_pl.data import WebDatasetDataModule
    from tests.support.fake_shards import write_shards

    sizes = [7, 5, 9, 3, 6]
    write_shards(str(tmp_path), sizes)
    world, batch = 2, 3
    plan = epoch_plan(sizes, world, 1, batch, seed=0, epoch=0)
    positions = [(i, k) for i in plan.order for k in range(sizes[i])]  # (shard, index in shard) of each position
    for rank in range(world):
        dm = WebDatasetDataModule(
            train_shards=str(tmp_path),
            batch_size=batch,
            num_workers=0,
            image_size=32,
            context_length=16,
            return_keys=True,
            shuffle_buffer=0,
            seed=0,
        )
        dm._topology = lambda rank=rank: (rank, world)
        dm.setup("fit")
        keys = [k for b in dm.train_dataloader() for k in b["key"]]
        w = plan.workers[rank]
        expected = [f"{s:05d}{k:04d}" for s, k in positions[w.start : w.stop]]
        assert keys == expected, rank
    torch.set_num_threads(torch.get_num_threads())
