"""The evaluation suite: a task list run on an exported tiny checkpoint gives clip_benchmark's own numbers
(its metric functions, PyPI ``clip-benchmark``, on the same files, class names and templates), and the
command line prints one table with the DataComp-style average.

    pytest tests/eval/test_suite.py
"""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.datasets import ImageFolder

from clip_pl.eval.suite import evaluate_tasks, suite_average
from clip_pl.eval.tasks import load_task_list
from clip_pl.interchange import build_from_checkpoint, export_open_clip, read_model_checkpoint
from clip_pl.model import get_tokenizer, image_transforms
from tests.support.eval import CLASSNAMES, TEMPLATES, tiny_checkpoint
from tests.support.eval_tasks import captioned_loader, captioned_shards, labelled_folder, write_task_list

# Compares two computations of the same numbers: also run under ATEN_CPU_CAPABILITY=avx2 in CI (.ci/run).
pytestmark = pytest.mark.numerics

clip_benchmark_zeroshot = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
clip_benchmark_retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")

TOLERANCE = 1e-3  # 0.1 percentage point


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    checkpoint, _, _ = tiny_checkpoint(root / "tiny.ckpt", seed=21)
    exported = export_open_clip(checkpoint, root / "exported")
    folder = labelled_folder(root / "digits")
    shards, images, captions = captioned_shards(root / "captions")
    task_list = write_task_list(
        root / "tasks.yaml",
        f"""
tasks:
  zs:
    type: zeroshot_classification
    data: digits
    classnames: {list(CLASSNAMES)}
    templates: {list(TEMPLATES)}
  captions:
    type: retrieval
    data: {{format: wds, path: captions, text_key: txt}}
    recall_k: [1, 5, 10]
""",
    )
    loaded = read_model_checkpoint(str(exported.directory))  # both sides evaluate the exported open_clip model
    model = build_from_checkpoint(loaded).eval()
    return {
        "root": root,
        "checkpoint": checkpoint,
        "model": model,
        "config": loaded.model_config,
        "folder": folder,
        "images": images,
        "captions": captions,
        "task_list": task_list,
    }


def clip_benchmark_classification(model, loader, tokenizer) -> dict[str, float]:
    """clip_benchmark's zero-shot classifier and logits; the three metrics from them as its ``evaluate`` computes
    them. (Its ``accuracy`` helper calls float() on a 1-element array, which NumPy 2 refuses, so top-k is
    counted here; mean per-class recall is the sklearn call it makes.)"""
    from sklearn.metrics import balanced_accuracy_score

    classifier = clip_benchmark_zeroshot.zero_shot_classifier(
        model, tokenizer, CLASSNAMES, [t.replace("{}", "{c}") for t in TEMPLATES], "cpu", amp=False
    )
    logits, target = clip_benchmark_zeroshot.run_classification(model, classifier, loader, "cpu", amp=False)
    top = logits.topk(5, dim=1).indices == target[:, None]
    return {
        "acc1": float(top[:, :1].any(1).float().mean()),
        "acc5": float(top.any(1).float().mean()),
        "mean_per_class_recall": balanced_accuracy_score(target, logits.argmax(1)),
    }


def test_the_suite_gives_clip_benchmarks_numbers(suite):
    tasks = load_task_list(suite["task_list"])
    ours = evaluate_tasks(suite["model"], suite["config"], tasks, batch_size=5)
    transform = image_transforms(suite["config"]["vision_cfg"]["image_size"])[1]
    tokenizer = get_tokenizer(suite["config"]["text_cfg"]["context_length"])

    folder = torch.utils.data.DataLoader(ImageFolder(str(suite["folder"]), transform=transform), batch_size=8)
    theirs = clip_benchmark_classification(suite["model"], folder, tokenizer)
    for metric in ("acc1", "acc5", "mean_per_class_recall"):
        assert abs(ours["zs"][metric] - theirs[metric]) <= TOLERANCE, (metric, ours["zs"][metric], theirs[metric])
    assert 0 < theirs["acc1"] < theirs["acc5"] < 1 and ours["zs"]["samples"] == 45
    assert abs(theirs["acc1"] - theirs["mean_per_class_recall"]) > 0.01

    loader = captioned_loader(suite["images"], suite["captions"], transform)
    theirs = clip_benchmark_retrieval.evaluate(
        suite["model"], loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10]
    )
    for metric, value in theirs.items():
        assert abs(ours["captions"][metric] - value) <= TOLERANCE, (metric, ours["captions"][metric], value)
    assert sum(0 < value < 1 for value in theirs.values()) >= 4  # not a trivial all-or-nothing case
    mean_r1 = (theirs["image_retrieval_recall@1"] + theirs["text_retrieval_recall@1"]) / 2
    assert suite_average(ours, tasks) == pytest.approx((ours["zs"]["acc1"] + mean_r1) / 2)


def test_the_command_line_prints_one_table_and_the_average(suite, tmp_path, capsys):
    # In-process (python -m clip_pl.eval is this run() behind @hydra.main; tests/eval/test_cli.py starts the process).
    from hydra import compose, initialize_config_dir

    from clip_pl.config_dir import config_dir
    from clip_pl.eval.__main__ import run

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "eval_app",
            overrides=[
                f"checkpoint={suite['checkpoint']}",
                "eval=suite",
                "num_workers=0",
                f"eval.task_list={suite['task_list']}",
                f"output_json={tmp_path / 'r.json'}",
            ],
        )
    run(cfg, "suite")
    printed = capsys.readouterr().out
    written = json.loads((tmp_path / "r.json").read_text())["results"]["suite"]
    assert "zs  " in printed and "mean_recall@1 *" in printed and "acc1 *" in printed
    assert f"DataComp-style: {100 * written['average']:.2f} %" in printed
    assert written["average"] == pytest.approx((written["zs/acc1"] + written["captions/mean_recall@1"]) / 2)


def test_the_suite_runs_during_training_every_n_steps(suite, tmp_path):
    from hydra import compose, initialize_config_dir

    from clip_pl.callbacks.evaluation import SuiteCallback
    from clip_pl.config_dir import config_dir
    from clip_pl.train import train

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "debug=smoke",
                "trainer.max_steps=3",
                "scheduler.warmup_steps=1",
                "data.batch_size=4",
                f"paths.root_dir={tmp_path}",
                "run_name=run",
                "eval=suite",
                f"eval.task_list={suite['task_list']}",
                "eval.callbacks.suite.every_n_steps=2",
                "eval.callbacks.suite.num_workers=0",
            ],
        )
        trainer = train(cfg)
    callback = next(cb for cb in trainer.callbacks if isinstance(cb, SuiteCallback))
    assert [step for step, _ in callback.history] == [2, 3]
    final = callback.last_metrics
    assert final["average"] == pytest.approx((final["zs/acc1"] + final["captions/mean_recall@1"]) / 2)
    assert float(trainer.callback_metrics["eval/suite/zs/acc1"]) == pytest.approx(final["zs/acc1"])
