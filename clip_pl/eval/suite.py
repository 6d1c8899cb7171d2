"""Run a checked task list (:mod:`clip_pl.eval.tasks`) on a model: every task's metrics under
clip_benchmark's names, and the DataComp-style average of each task's main metric.

Names as clip_benchmark reports them: ``acc1``, ``acc5`` (only with at least 5 classes, where
clip_benchmark reports NaN), ``mean_per_class_recall``; ``image_retrieval_recall@k`` (a caption finds
its image), ``text_retrieval_recall@k`` (an image finds one of its captions), and ``mean_recall@k``
of the two (DataComp's retrieval score at k=1); ``lp_acc1``, ``lp_acc5``, ``lp_mean_per_class_recall``.
Every task is collective: all ranks call :func:`evaluate_tasks`, each evaluates its slice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from clip_pl.eval.common import AutocastFactory, no_autocast
from clip_pl.eval.retrieval import retrieval_evaluate
from clip_pl.eval.tasks import LINEAR_PROBE, RETRIEVAL, ZEROSHOT, Task
from clip_pl.eval.zeroshot import zero_shot_evaluate

AVERAGE = "average"


def _counts(result: Mapping[str, Any]) -> dict[str, Any]:
    """The sample counts and bad-sample tallies, kept next to the metrics."""
    return {k: v for k, v in result.items() if isinstance(v, int) or k.startswith("bad_samples/")}


def _zeroshot(
    model: nn.Module,
    config: Mapping[str, Any],
    task: Task,
    batch_size: int,
    num_workers: int,
    autocast: AutocastFactory,
) -> dict[str, Any]:
    raw = zero_shot_evaluate(
        model,
        config,
        task.data.path,
        task.classnames,
        task.templates,
        batch_size=batch_size,
        num_workers=num_workers,
        label_key=task.data.label_key,
        autocast=autocast,
    )
    named = {"acc1": raw["top1"], "mean_per_class_recall": raw["mean_per_class_recall"]}
    if len(task.classnames) >= 5:
        named["acc5"] = raw["top5"]
    return {**{m: named[m] for m in task.metrics if m in named}, **_counts(raw)}


def _retrieval(
    model: nn.Module,
    config: Mapping[str, Any],
    task: Task,
    batch_size: int,
    num_workers: int,
    autocast: AutocastFactory,
) -> dict[str, Any]:
    raw = retrieval_evaluate(
        model,
        config,
        task.data.path,
        batch_size=batch_size,
        num_workers=num_workers,
        text_key=task.data.text_key,
        caption_separator=task.data.caption_separator,
        ks=task.recall_k,
        autocast=autocast,
    )
    named = {}
    for k in task.recall_k:
        named[f"image_retrieval_recall@{k}"] = raw[f"text_to_image_R@{k}"]
        named[f"text_retrieval_recall@{k}"] = raw[f"image_to_text_R@{k}"]
        named[f"mean_recall@{k}"] = (named[f"image_retrieval_recall@{k}"] + named[f"text_retrieval_recall@{k}"]) / 2
    return {**{m: named[m] for m in task.metrics}, **_counts(raw)}


def _linear_probe(
    model: nn.Module,
    config: Mapping[str, Any],
    task: Task,
    batch_size: int,
    num_workers: int,
    autocast: AutocastFactory,
) -> dict[str, Any]:
    from clip_pl.eval.linear_probe import linear_probe_evaluate

    raw = linear_probe_evaluate(model, config, task, batch_size=batch_size, num_workers=num_workers, autocast=autocast)
    return {
        **{m: raw[m] for m in task.metrics if m in raw},
        **{k: v for k, v in raw.items() if not k.startswith("lp_")},
    }


_RUNNERS = {ZEROSHOT: _zeroshot, RETRIEVAL: _retrieval, LINEAR_PROBE: _linear_probe}


def evaluate_task(
    model: nn.Module,
    model_config: Mapping[str, Any],
    task: Task,
    batch_size: int = 64,
    num_workers: int = 0,
    autocast: AutocastFactory = no_autocast,
) -> dict[str, Any]:
    return _RUNNERS[task.type](model, model_config, task, task.batch_size or batch_size, num_workers, autocast)


def evaluate_tasks(
    model: nn.Module,
    model_config: Mapping[str, Any],
    tasks: Sequence[Task],
    batch_size: int = 64,
    num_workers: int = 0,
    autocast: AutocastFactory = no_autocast,
) -> dict[str, dict[str, Any]]:
    """{task name: its metrics} in the list's order."""
    return {task.name: evaluate_task(model, model_config, task, batch_size, num_workers, autocast) for task in tasks}


def suite_average(results: Mapping[str, Mapping[str, Any]], tasks: Sequence[Task]) -> float:
    """Mean over tasks of each one's main metric (DataComp averages its 38 tasks this way)."""
    return sum(float(results[t.name][t.main_metric]) for t in tasks) / len(tasks)
