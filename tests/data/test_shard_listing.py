"""Start-up at scale: one rank lists and stats the shards, the others receive the result.

    pytest tests/data/test_shard_listing.py      # ~15 s (2 gloo ranks)

The file-system calls under the shard folder are counted on each rank while the datamodule sets
up: rank 0 makes them all, rank 1 none. With LAION-400M on 256 GPUs that is 41 456 calls instead of
10.6 M on a shared file system.
"""

from __future__ import annotations

import os

import pytest

from tests.support.distributed import run_distributed

SHARDS = 12


def _count_fs_calls(root: str):
    """Wrap the os functions that touch the file system; count calls whose path is under ``root``."""
    counts = {"n": 0}
    for name in ("stat", "lstat", "scandir", "listdir", "open"):
        real = getattr(os, name)

        def wrapper(path=".", *args, _real=real, **kwargs):
            if isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(root):
                counts["n"] += 1
            return _real(path, *args, **kwargs)

        setattr(os, name, wrapper)
    return counts


def _setup_and_count(rank: int, world_size: int, root: str, spec: str) -> dict:
    from clip_pl.data import WebDatasetDataModule

    counts = _count_fs_calls(root)
    dm = WebDatasetDataModule(train_shards=spec, batch_size=2, num_workers=0, image_size=32, context_length=16)
    try:
        dm.setup("fit")
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "fs_calls": counts["n"]}
    shards = dm._train_shards()
    return {"fs_calls": counts["n"], "urls": [s.url for s in shards.shards], "total": shards.total_samples}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    from tests.support.fake_shards import write_shards

    root = tmp_path_factory.mktemp("shards")
    write_shards(str(root), [5] * SHARDS)
    return root


@pytest.mark.slow  # multi-process or subprocess: > ~10 s on 2 cores (make test-quick leaves it out)
def test_only_rank_0_touches_the_shards_at_setup(shard_dir):
    spec = f"{shard_dir}/{{00000..{SHARDS - 1:05d}}}.tar"  # a brace pattern: one stat per shard
    r0, r1 = run_distributed(_setup_and_count, world_size=2, args=(str(shard_dir), spec), timeout=120)
    assert "error" not in r0 and "error" not in r1, (r0, r1)
    assert r0["fs_calls"] >= SHARDS and r1["fs_calls"] == 0, (r0["fs_calls"], r1["fs_calls"])
    assert r0["urls"] == r1["urls"] and len(r0["urls"]) == SHARDS and r0["total"] == r1["total"] == 5 * SHARDS


@pytest.mark.slow  # multi-process or subprocess: > ~10 s on 2 cores (make test-quick leaves it out)
def test_an_error_on_rank_0_is_raised_on_every_rank(shard_dir):
    spec = f"{shard_dir}/{{00000..{SHARDS:05d}}}.tar"  # one shard too many
    results = run_distributed(_setup_and_count, world_size=2, args=(str(shard_dir), spec), timeout=120)
    assert all(r.get("error", "").startswith("FileNotFoundError") for r in results), results
    assert results[1]["fs_calls"] == 0
