"""Shard specs: folders, brace patterns, globs, '::' sources with weights, pipe: commands; the val loader.

python -m pytest tests/data/test_shardspec.py -q
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from clip_pl.data import WebDatasetDataModule, resolve_shards
from tests.support.fake_shards import make_sample, write_shards


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    a = tmp_path_factory.mktemp("a")
    b = tmp_path_factory.mktemp("b")
    write_shards(str(a), [6, 4, 5])
    write_shards(str(b), [7, 3])
    return a, b


def test_folder_brace_glob_and_sources(two_sources):
    a, b = two_sources
    by_folder = resolve_shards(str(a))
    by_brace = resolve_shards(f"{a}/{{00000..00002}}.tar")
    by_glob = resolve_shards(f"{a}/*.tar")
    assert [s.url for s in by_folder.shards] == [s.url for s in by_brace.shards] == [s.url for s in by_glob.shards]
    assert by_folder.total_samples == 15
    joined = resolve_shards(f"{a}::{b}/{{00000..00001}}.tar", weights="1::3")
    assert joined.weights == (1.0, 3.0) and joined.total_samples == 25
    assert [s.source for s in joined.shards] == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="one weight per source"):
        resolve_shards(f"{a}::{b}", weights="1::2::3")


def test_pipe_shards_with_sizes_file_read_exactly_once(two_sources):
    a, _ = two_sources
    spec = f"pipe:cat {a}/{{00000..00002}}.tar"
    assert resolve_shards(spec).sizes_known is False, "a pipe: command has no manifest beside it"
    dm = WebDatasetDataModule(
        spec,
        sizes_file=str(a / "sizes.json"),
        batch_size=5,
        num_workers=0,
        image_size=32,
        context_length=16,
        return_keys=True,
    )
    dm.setup("fit")
    keys = [k for batch in dm.train_dataloader() for k in batch["key"]]
    assert sorted(keys) == sorted(f"{s:05d}{i:04d}" for s, n in enumerate([6, 4, 5]) for i in range(n))


@pytest.mark.parametrize("weights,share", [("1::3", 0.75), ("1::1", 0.5)])
def test_resampled_follows_source_weights_per_source_not_per_shard(tmp_path, weights, share):
    # Source a has 6 shards, b only 1: weighting each shard by its source's weight (instead of
    # splitting the weight over the source's shards) would give b 3/9 or 1/7 of the samples.
    a, b = tmp_path / "a", tmp_path / "b"
    write_shards(str(a), [5] * 6)
    write_shards(str(b), [5], sample_fn=lambda key, index: make_sample("b" + key, index))
    dm = WebDatasetDataModule(
        f"{a}::{b}",
        train_weights=weights,
        resampled=True,
        num_samples=600,
        batch_size=50,
        num_workers=0,
        image_size=16,
        context_length=8,
        return_keys=True,
        shuffle_buffer=20,
    )
    dm.setup("fit")
    keys = [k for batch in dm.train_dataloader() for k in batch["key"]]
    assert len(keys) == 600
    share_b = sum(k.startswith("b") for k in keys) / len(keys)
    # 120 shard draws: the standard error of the share is <= 0.046; the seeded draw is deterministic.
    assert abs(share_b - share) < 0.1, f"source b has weight {weights}, got a {share_b:.2f} share"
    shards_a = Counter(k[:5] for k in keys if not k.startswith("b"))
    assert len(shards_a) == 6, "every shard of source a is drawn"


def _val_rank(rank, world, shards):
    torch.set_num_threads(1)

    def make():
        return WebDatasetDataModule(
            shards, val_shards=shards, batch_size=3, num_workers=0, image_size=32, context_length=16, return_keys=True
        )

    dm = make()
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    again = make()
    again.setup("validate")
    return batches, next(iter(again.val_dataloader()))


@pytest.mark.slow  # multi-process or subprocess: > ~10 s on 2 cores (make test-quick leaves it out)
def test_val_loader_uses_eval_transform_and_equal_batches(two_sources):
    from tests.support.distributed import run_distributed

    a, _ = two_sources
    ranks = run_distributed(_val_rank, 2, args=(str(a),))
    assert [len(batches) for batches, _ in ranks] == [2, 2], "15 samples, 2 ranks × 3 → 2 full batches each"
    keys = [k for batches, _ in ranks for batch in batches for k in batch["key"]]
    assert len(keys) == len(set(keys)) == 12, "the ranks evaluate disjoint samples"
    for batches, first_again in ranks:
        assert torch.equal(first_again["image"], batches[0]["image"]), "eval: no random crop, same pixels every time"
