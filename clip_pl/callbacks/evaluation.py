"""Evaluation during training, on every rank at once (no rank-0-only loop for others to wait on).

Configured in ``clip_pl/conf/eval/*.yaml`` under ``callbacks:``; the training config instantiates them:

    python -m clip_pl.train eval=demo_digits                  # zero-shot on the demo's held-out digits
    python -m clip_pl.train eval=imagenet_zeroshot eval.callbacks.imagenet.every_n_steps=2000
    python -m clip_pl.train experiment=demo eval=suite eval.task_list=demo_out/tasks.yaml   # a task list

Every ``every_n_steps`` optimiser steps (and once when training ends, unless that step was just
evaluated) each rank evaluates its slice of the data with the model in eval mode under the
trainer's precision context, counts are summed across ranks, and ``eval/<name>/<metric>`` goes to
the loggers (rank 0) and to ``trainer.callback_metrics`` (so ModelCheckpoint can monitor it).
The callbacks need ``pl_module.model`` (the open_clip model) and ``pl_module.model_config``.
Under FSDP / DeepSpeed ZeRO-3 the parameters are sharded outside forward(), so the callbacks refuse
to start there (use DDP or ZeRO-1/2, or evaluate the checkpoints with ``python -m clip_pl.eval``).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from clip_pl.callbacks.ema import evaluation_weights
from clip_pl.callbacks.telemetry import pause_clock
from clip_pl.eval import datasets
from clip_pl.eval.common import AutocastFactory, no_autocast
from clip_pl.eval.labels import load_classnames, load_templates
from clip_pl.eval.report import format_suite_table, format_table
from clip_pl.eval.retrieval import RECALL_K, retrieval_evaluate
from clip_pl.eval.suite import AVERAGE, evaluate_tasks, suite_average
from clip_pl.eval.tasks import load_task_list
from clip_pl.eval.zeroshot import zero_shot_evaluate


def check_strategy(strategy: Any) -> None:
    """Refuse, at fit start, strategies whose parameters are sharded outside forward()."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    # FSDP2 (ModelParallelStrategy) gathers parameters around forward() only; the evaluators call
    # encode_image / encode_text on their own.
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)) or (
        isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3
    ):
        raise ValueError(
            f"evaluation callbacks cannot run under {type(strategy).__name__} with sharded parameters "
            f"(FSDP / ZeRO-3 keep each rank's slice only): train with strategy=ddp or "
            f"deepspeed_stage_1/2, or use eval=none and evaluate the saved checkpoints with "
            f"`python -m clip_pl.eval checkpoint=… eval=…`."
        )


def _require_data(data: str | Sequence[str] | None, name: str) -> str | list[str]:
    if data is None or (isinstance(data, str) and not data.strip()):
        raise ValueError(
            f"eval callback {name!r}: no evaluation data given. Set the paths.* key its eval "
            f"config reads (e.g. paths.imagenet_val_dir=/data/imagenet/val, "
            f"paths.retrieval_shards='/data/coco/{{0000..0004}}.tar') or eval.callbacks.{name}.data."
        )
    return data if isinstance(data, str) else [str(d) for d in data]


class _PeriodicEvaluation(pl.Callback, ABC):
    def __init__(self, name: str, every_n_steps: int, at_train_end: bool):
        if every_n_steps < 0:
            raise ValueError(
                f"eval callback {name!r}: every_n_steps={every_n_steps} must be >= 0 (0: only at the end)."
            )
        self.name = name
        self.every_n_steps = int(every_n_steps)
        self.at_train_end = at_train_end
        self.last_metrics: dict[str, float] = {}
        self.history: list[tuple[int, dict[str, float]]] = []  # (global_step, metrics)
        self._last_step = -1

    @abstractmethod
    def evaluate(
        self, model: nn.Module, model_config: Mapping[str, Any], autocast: AutocastFactory = no_autocast
    ) -> dict[str, float]:
        """This task's metrics for ``model``, computed over all ranks (every rank calls it)."""

    def table(self, metrics: Mapping[str, float]) -> str:
        """How ``python -m clip_pl.eval`` prints this callback's metrics."""
        return format_table({self.name: metrics})

    def _evaluate_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        start = time.perf_counter()
        with pause_clock(trainer), evaluation_weights(trainer, pl_module):  # EMA weights if callbacks.ema asks
            metrics = self.evaluate(
                pl_module.model, pl_module.model_config, autocast=trainer.precision_plugin.forward_context
            )
        metrics["seconds"] = time.perf_counter() - start
        self._last_step = trainer.global_step
        self.last_metrics = metrics
        self.history.append((trainer.global_step, metrics))
        logged = {f"eval/{self.name}/{key}": float(value) for key, value in metrics.items()}
        if trainer.is_global_zero:  # logger.log_metrics directly: self.log only reaches loggers every log_every_n_steps
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=trainer.global_step)
        return logged

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy)
        if not (hasattr(pl_module, "model") and hasattr(pl_module, "model_config")):
            raise AttributeError(
                f"eval callback {self.name!r} needs the LightningModule to expose `model` (the "
                f"open_clip model) and `model_config`; {type(pl_module).__name__} does not."
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches end at the same global_step: evaluate once.
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            for key, value in self._evaluate_now(trainer, pl_module).items():
                # Identical on every rank after the all-reduce, hence no sync_dist.
                pl_module.log(
                    key, value, logger=False, on_step=True, on_epoch=False, rank_zero_only=False, sync_dist=False
                )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            logged = self._evaluate_now(trainer, pl_module)
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in logged.items()})


class ZeroShotCallback(_PeriodicEvaluation):
    """Zero-shot top-1/top-5 on an ImageFolder directory or labelled WebDataset shards.

    classnames: ``"imagenet"``, a file (line k = class k) or a list; templates: ``"openai_imagenet"``,
    ``"simple_imagenet"``, a file (one ``{}`` template per line) or a list. Both are read and
    checked here, at construction, so a bad list fails before training starts.
    """

    def __init__(
        self,
        data: str | Sequence[str],
        classnames: str | Sequence[str] = "imagenet",
        templates: str | Sequence[str] = "openai_imagenet",
        name: str = "zeroshot",
        every_n_steps: int = 1000,
        at_train_end: bool = True,
        batch_size: int = 64,
        num_workers: int = 4,
        label_key: str = "cls",
    ):
        super().__init__(name, every_n_steps, at_train_end)
        self.data = _require_data(data, name)
        self.classnames = load_classnames(classnames if isinstance(classnames, str) else list(classnames))
        self.templates = load_templates(templates if isinstance(templates, str) else list(templates))
        if not datasets.is_imagefolder(self.data):
            datasets.expand_shards(self.data)  # fail now on missing shards
        self.batch_size, self.num_workers, self.label_key = batch_size, num_workers, label_key

    def evaluate(
        self, model: nn.Module, model_config: Mapping[str, Any], autocast: AutocastFactory = no_autocast
    ) -> dict[str, float]:
        return zero_shot_evaluate(
            model,
            model_config,
            self.data,
            self.classnames,
            self.templates,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            label_key=self.label_key,
            autocast=autocast,
        )


class RetrievalCallback(_PeriodicEvaluation):
    """Image→text and text→image recall@k on an image-caption WebDataset.

    A sample's ``text_key`` entry holds its captions, split on ``caption_separator`` (None: one
    caption per sample); images whose text is empty are gallery items only, and are counted.
    """

    def __init__(
        self,
        data: str | Sequence[str],
        name: str = "retrieval",
        every_n_steps: int = 1000,
        at_train_end: bool = True,
        batch_size: int = 64,
        num_workers: int = 4,
        text_key: str = "txt",
        caption_separator: str | None = "\n",
        ks: Sequence[int] = RECALL_K,
        chunk_size: int = 1024,
    ):
        super().__init__(name, every_n_steps, at_train_end)
        self.data = _require_data(data, name)
        datasets.expand_shards(self.data)  # fail now on missing shards
        if chunk_size <= 0 or not ks or min(ks) <= 0:
            raise ValueError(f"retrieval {name!r}: chunk_size and every k must be positive (got {chunk_size}, {ks}).")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.text_key, self.caption_separator = text_key, caption_separator
        self.ks, self.chunk_size = tuple(int(k) for k in ks), chunk_size

    def evaluate(
        self, model: nn.Module, model_config: Mapping[str, Any], autocast: AutocastFactory = no_autocast
    ) -> dict[str, float]:
        return retrieval_evaluate(
            model,
            model_config,
            self.data,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            text_key=self.text_key,
            caption_separator=self.caption_separator,
            ks=self.ks,
            chunk_size=self.chunk_size,
            autocast=autocast,
        )


class SuiteCallback(_PeriodicEvaluation):
    """Every task of a task list (``clip_pl/eval/tasks.py``: zero-shot classification, retrieval, linear
    probes), each sharded across ranks; logs ``eval/<name>/<task>/<metric>`` and ``eval/<name>/average``
    (the mean of each task's main metric, DataComp-style). The list is read and checked here, at
    construction, so a bad list fails before the model is loaded or training starts.
    """

    def __init__(
        self,
        task_list: str,
        name: str = "suite",
        every_n_steps: int = 1000,
        at_train_end: bool = True,
        batch_size: int = 64,
        num_workers: int = 4,
    ):
        super().__init__(name, every_n_steps, at_train_end)
        if not task_list:
            raise ValueError(
                f"eval callback {name!r}: no task list given; pass eval.task_list=PATH to a YAML task "
                f"list (format: clip_pl/eval/tasks.py, example: docs/evaluation.md)."
            )
        self.tasks = load_task_list(task_list)
        self.batch_size, self.num_workers = batch_size, num_workers

    def evaluate(
        self, model: nn.Module, model_config: Mapping[str, Any], autocast: AutocastFactory = no_autocast
    ) -> dict[str, float]:
        results = evaluate_tasks(
            model, model_config, self.tasks, batch_size=self.batch_size, num_workers=self.num_workers, autocast=autocast
        )
        flat = {f"{task}/{metric}": value for task, metrics in results.items() for metric, value in metrics.items()}
        flat[AVERAGE] = suite_average(results, self.tasks)
        return flat

    def table(self, metrics: Mapping[str, float]) -> str:
        return format_suite_table(metrics, [(t.name, t.type, t.main_metric) for t in self.tasks])
