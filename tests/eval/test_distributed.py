"""Evaluation sharded over 2 real gloo processes equals the single-process result exactly,
for uneven slices (13 images over 2 ranks, 3 shards over 2 ranks, 1 shard split by sample)
and for a rank that receives nothing at all; a whole task list (zero-shot, retrieval, linear probes) too.

    pytest tests/eval/test_distributed.py
"""

from __future__ import annotations

import pytest
import torch

from clip_pl.eval.retrieval import retrieval_evaluate
from clip_pl.eval.zeroshot import build_classifier, zero_shot_evaluate
from clip_pl.interchange import build_from_checkpoint, read_model_checkpoint
from clip_pl.model import get_tokenizer
from tests.support.distributed import run_distributed
from tests.support.eval import (
    CLASSNAMES,
    TEMPLATES,
    caption_samples,
    captions_for,
    labelled_samples,
    random_images,
    tiny_checkpoint,
    write_imagefolder,
    write_shards,
)
from tests.support.eval_tasks import write_task_list, zeroshot_task_yaml

# Compares two computations of the same numbers: also run under ATEN_CPU_CAPABILITY=avx2 in CI (.ci/run).
pytestmark = pytest.mark.numerics


def evaluate_all(rank: int, world_size: int, checkpoint: str, cases: dict) -> dict:
    loaded = read_model_checkpoint(checkpoint)
    model, config = build_from_checkpoint(loaded).eval(), loaded.model_config
    out = {"classifier": build_classifier(model, get_tokenizer(16), CLASSNAMES, TEMPLATES, embed_dim=32)}
    for name, data in cases["zeroshot"].items():
        out[name] = zero_shot_evaluate(model, config, data, CLASSNAMES, TEMPLATES, batch_size=4)
    for name, data in cases["retrieval"].items():
        out[name] = retrieval_evaluate(model, config, data, batch_size=3, ks=(1, 2, 5), chunk_size=4)
    return out


def test_two_gloo_ranks_equal_one_process(tmp_path):
    checkpoint, _, _ = tiny_checkpoint(tmp_path / "tiny.ckpt", seed=4)
    images = random_images(13, seed=5)
    labels = [i % len(CLASSNAMES) for i in range(13)]
    captions = captions_for([2, 1, 0, 3, 1, 1, 2, 1, 1])
    cases = {
        "zeroshot": {
            "folder": str(write_imagefolder(tmp_path / "folder", images, labels)),
            "three_shards": write_shards(tmp_path / "z3", labelled_samples(images, labels), 3),
            "one_shard": write_shards(tmp_path / "z1", labelled_samples(images, labels), 1),
        },
        "retrieval": {
            "two_shards": write_shards(tmp_path / "r2", caption_samples(images[:9], captions), 2),
            "one_shard": write_shards(tmp_path / "r1", caption_samples(images[:9], captions), 1),
            "single_sample": write_shards(tmp_path / "r0", caption_samples(images[:1], captions[:1]), 1),
        },
    }
    single = evaluate_all(0, 1, str(checkpoint), cases)
    ranks = run_distributed(evaluate_all, world_size=2, args=(str(checkpoint), cases))
    for result in ranks:
        torch.testing.assert_close(result.pop("classifier"), single["classifier"], atol=1e-6, rtol=1e-5)
    single.pop("classifier")
    for name, expected in single.items():
        for rank, result in enumerate(ranks):
            assert result[name] == expected, f"{name} on rank {rank}"
    assert single["folder"]["samples"] == 13 and single["single_sample"]["images"] == 1


def evaluate_suite(rank: int, world_size: int, checkpoint: str, task_list: str) -> dict:
    from clip_pl.eval.suite import evaluate_tasks
    from clip_pl.eval.tasks import load_task_list

    loaded = read_model_checkpoint(checkpoint)
    return evaluate_tasks(
        build_from_checkpoint(loaded).eval(), loaded.model_config, load_task_list(task_list), batch_size=4
    )


@pytest.mark.slow  # multi-process or subprocess: > ~10 s on 2 cores (make test-quick leaves it out)
def test_a_task_list_on_two_gloo_ranks_equals_one_process(tmp_path):
    """Zero-shot (13 images), retrieval (3 shards of 9 images), linear probes (15 / 7 images, held-out val,
    few-shot): odd sizes, so the ranks get unequal slices."""
    checkpoint, _, _ = tiny_checkpoint(tmp_path / "tiny.ckpt", seed=4)
    images = random_images(35, seed=5)
    write_imagefolder(tmp_path / "zs", images[:13], [i % len(CLASSNAMES) for i in range(13)])
    write_imagefolder(tmp_path / "train", images[13:28], [i % 3 for i in range(15)])
    write_imagefolder(tmp_path / "test", images[28:], [i % 3 for i in range(7)])
    write_shards(tmp_path / "captions", caption_samples(images[:9], captions_for([2, 1, 1, 3, 1, 1, 2, 1, 1])), 3)
    task_list = write_task_list(
        tmp_path / "tasks.yaml",
        "tasks:\n"
        + zeroshot_task_yaml("zs")
        + """
  captions:
    type: retrieval
    data: captions
    recall_k: [1, 2, 5]
  probe:
    type: linear_probe
    train: train
    test: test
    val_fraction: 0.3
  probe2:
    type: linear_probe
    train: {format: imagefolder, path: train}
    val: test
    test: test
    fewshot_k: 2
""",
    )
    single = evaluate_suite(0, 1, str(checkpoint), str(task_list))
    ranks = run_distributed(evaluate_suite, world_size=2, args=(str(checkpoint), str(task_list)))
    for rank, result in enumerate(ranks):
        assert result == single, f"rank {rank}"
    assert single["zs"]["samples"] == 13 and single["captions"]["images"] == 9
    assert single["probe"]["test_samples"] == 7 and single["probe2"]["train_samples"] == 6
