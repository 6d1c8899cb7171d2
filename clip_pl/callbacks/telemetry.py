"""Is the run healthy and how fast is it: throughput, MFU, data wait, memory, bad samples.

Logged every ``log_every_n_steps`` optimizer steps and at step 1, under ``perf/`` and ``data/``:
samples/s (global and per device), TFLOP/s per device, MFU (model FLOPs per sample counted once
with torch's FlopCounterMode on the meta device; peak FLOP/s looked up by device name and
precision, never assumed), the share of wall time blocked in the DataLoader's ``next()`` (data
wait: copies, logging and checkpoints are not counted), peak accelerator memory, and bad-sample
counts summed over ranks. The clock pauses during validation and during
any evaluation wrapped in ``pause_clock(trainer)``. Every ``heatmap_every_n_steps`` a batch's
image-text similarity matrix is saved as a PNG (``clip_pl.callbacks.heatmap``; also sent to W&B).
The bad-sample counts come from the batches themselves (``batch["bad_samples"]``, see
``clip_pl.data.accounting``). The progress bar that shows these numbers is ``clip_pl.callbacks.progress``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode

from clip_pl.callbacks.heatmap import save_similarity_heatmap
from clip_pl.data.accounting import sum_over_ranks
from clip_pl.model import build_clip, context_length_of, image_size_of

log = logging.getLogger(__name__)

# Dense peak FLOP/s per device, by precision (vendor datasheets; sparsity not counted).
# Matched by substring of torch.cuda.get_device_name(), most specific first.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("GB200", {"bf16": 2.5e15, "fp16": 2.5e15, "tf32": 1.25e15, "fp32": 80e12}),
    ("B200", {"bf16": 2.25e15, "fp16": 2.25e15, "tf32": 1.1e15, "fp32": 80e12}),
    ("GH200", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),  # before "H200"
    ("H200 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),  # before "H200"
    # NVIDIA H200 SXM datasheet: BF16 Tensor Core 1 979 TFLOP/s *with sparsity*, i.e. 989.4 dense; the
    # same Hopper chip and clocks as the H100 SXM (a bf16 8192³ matmul measured ~790 there, KINDS.md).
    ("H200", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("H100 PCIe", {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378e12, "fp32": 51.2e12}),
    ("H100 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.8e12, "fp32": 60e12}),
    ("H100", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("A800", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("L40", {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12, "tf32": 15.7e12}),
    ("RTX 4090", {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    ("MI300X", {"bf16": 1307.4e12, "fp16": 1307.4e12, "tf32": 653.7e12, "fp32": 163.4e12}),
    ("MI250X", {"bf16": 383e12, "fp16": 383e12, "fp32": 47.9e12}),
]


def precision_key(precision: str) -> str:
    """Lightning precision string -> the PEAK_FLOPS column the matmuls run in."""
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    # fp32 runs use TF32 tensor cores wherever PyTorch allows it: matmuls when the float32 matmul
    # precision is below "highest", convolutions (patch embedding, ResNet towers) whenever cuDNN's
    # allow_tf32 is on, which is PyTorch's default. Against the fp32 peak MFU could pass 100 %.
    tf32 = torch.get_float32_matmul_precision() != "highest" or torch.backends.cudnn.allow_tf32
    return "tf32" if tf32 else "fp32"


def peak_flops_per_device(device_name: str, precision: str) -> float | None:
    """Peak dense FLOP/s of one device at this precision, or None when the device is unknown."""
    for pattern, peaks in PEAK_FLOPS:
        if pattern.lower() in device_name.lower():
            return peaks.get(precision_key(precision))
    return None


def train_flops_per_sample(model_config: Mapping[str, Any]) -> dict[str, float]:
    """Forward and forward+backward FLOPs of one image-text pair through both towers.

    Counted on the meta device (no memory, no compute) with torch's FlopCounterMode, so patch
    dropout, context length and any architecture are accounted for as they really run. The
    contrastive loss itself (b×N logits) is left out: it is negligible next to the towers.
    """
    with torch.device("meta"):
        model = build_clip(model_config)
        size, length = image_size_of(model_config), context_length_of(model_config)
        images = torch.randn(1, 3, size, size)
        texts = torch.zeros(1, length, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        image_features, text_features = model.encode_image(images), model.encode_text(texts)
    forward = counter.get_total_flops()
    with counter:  # counting restarts on entry
        image_features, text_features = model.encode_image(images), model.encode_text(texts)
        (image_features.sum() + text_features.sum()).backward()
    return {"forward": float(forward), "train": float(counter.get_total_flops())}


@contextlib.contextmanager
def pause_clock(trainer: L.Trainer) -> Iterator[None]:
    """Evaluation inside the training loop: keep its time out of throughput and data wait."""
    start = time.perf_counter()
    try:
        yield
    finally:
        for callback in trainer.callbacks:
            if isinstance(callback, Telemetry):
                callback.paused_s += time.perf_counter() - start


# Lightning's training loop brackets every fetch from the train DataLoader (the ``next()`` of its
# iterator, nothing else) with this profiler action; see ``_TrainingEpochLoop._on_before_fetch``.
FETCH_ACTION = "train_dataloader_next"


class Telemetry(L.Callback):
    """Throughput, MFU, data wait and memory per window of ``log_every_n_steps`` steps.

    **Data wait** is the time the training process spent blocked in the DataLoader's ``next()``,
    as a share of the window's wall time. It is timed around the fetch alone (through the
    trainer's profiler hooks, which Lightning calls just around ``next()``), so host-to-device
    copies, logging, a progress bar's ``.item()`` and checkpoint saves are not data wait. **Step
    time** is the window's wall time over its steps; on CUDA the window ends with a synchronise, so
    it covers the kernels the window queued, not only their launch (one sync per window, no more).
    """

    def __init__(
        self,
        log_every_n_steps: int = 10,
        heatmap_every_n_steps: int = 0,
        heatmap_size: int = 16,
        peak_flops_per_device: float | None = None,
    ):
        self.log_every_n_steps = max(1, log_every_n_steps)
        self.heatmap_every_n_steps = heatmap_every_n_steps
        self.heatmap_size = heatmap_size
        self.peak_override = peak_flops_per_device
        self.paused_s = 0.0
        self.bad_samples: Counter[str] = Counter()  # this rank's totals since the callback was built
        self.flops: dict[str, float] = {}
        self.peak_flops: float | None = None
        self._fetch_started: float | None = None
        self._timed_profiler: Any = None
        self._reset_window()

    def _reset_window(self) -> None:
        self.window = {"start": time.perf_counter(), "samples": 0, "steps": 0, "wait": 0.0, "paused": self.paused_s}

    # -- set-up ---------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flops = train_flops_per_sample(pl_module.model_config)
        self.peak_flops = self.peak_override
        if self.peak_flops is None and trainer.strategy.root_device.type == "cuda":
            name = torch.cuda.get_device_name(trainer.strategy.root_device)
            self.peak_flops = peak_flops_per_device(name, str(trainer.precision))
            if self.peak_flops is None:
                log.warning(
                    "MFU not logged: %r is not in clip_pl.callbacks.telemetry.PEAK_FLOPS; set "
                    "callbacks.telemetry.peak_flops_per_device to its dense peak FLOP/s.",
                    name,
                )
        self._time_fetches(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._synchronize(trainer)
        self._reset_window()  # set-up and checkpoint loading are not training time

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._untime_fetches()

    # -- the clock ------------------------------------------------------------------------
    def _time_fetches(self, trainer: L.Trainer) -> None:
        """Wrap the trainer's profiler (any profiler: Lightning calls a pass-through one when none is
        set) so that the fetch action's start and stop also feed the window's data wait."""
        if self._timed_profiler is not None:
            return
        profiler = self._timed_profiler = trainer.profiler
        start, stop = profiler.start, profiler.stop

        def timed_start(action_name: str) -> None:
            start(action_name)
            if action_name.endswith(FETCH_ACTION):
                self._fetch_started = time.perf_counter()

        def timed_stop(action_name: str) -> None:
            if action_name.endswith(FETCH_ACTION) and self._fetch_started is not None:
                self.window["wait"] += time.perf_counter() - self._fetch_started
                self._fetch_started = None
            stop(action_name)

        profiler.start, profiler.stop = timed_start, timed_stop

    def _untime_fetches(self) -> None:
        if self._timed_profiler is not None:  # back to the class's own methods
            for name in ("start", "stop"):
                self._timed_profiler.__dict__.pop(name, None)
            self._timed_profiler = None

    @staticmethod
    def _synchronize(trainer: L.Trainer) -> None:
        # CUDA runs ahead of Python: without this the window would end when the last kernel was
        # queued, and the time it took would land in whichever window first waits for the GPU.
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.window["samples"] += batch["image"].shape[0]
        # What the loader worker that made this batch skipped or converted since its previous batch.
        self.bad_samples.update(batch.get("bad_samples") or {})
        self.window["steps"] += 1
        step = trainer.global_step
        if step == 1 or step % self.log_every_n_steps == 0:
            self._log_window(trainer, pl_module)
        if self.heatmap_every_n_steps and step % self.heatmap_every_n_steps == 0:
            with pause_clock(trainer):
                save_similarity_heatmap(trainer, pl_module, batch, self.heatmap_size)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.paused_s += time.perf_counter() - self._validation_start

    # -- reporting ------------------------------------------------------------------------
    def _log_window(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        w = self.window
        self._synchronize(trainer)
        # A collective: every rank calls it at every logged step, before anything rank-local can return
        # early (a rank that skipped it would pair its next collective with this one: a hang).
        bad_samples = sum_over_ranks(self.bad_samples)
        elapsed = time.perf_counter() - w["start"] - (self.paused_s - w["paused"])
        if elapsed <= 0 or w["steps"] == 0:
            return
        per_device = w["samples"] / elapsed
        metrics = {
            "perf/samples_per_s": per_device * trainer.world_size,
            "perf/samples_per_s_per_device": per_device,
            "perf/step_time_s": elapsed / w["steps"],
            "perf/data_wait_share": min(1.0, w["wait"] / elapsed),
            "perf/tflops_per_device": per_device * self.flops.get("train", 0.0) / 1e12,
        }
        if self.peak_flops:
            metrics["perf/mfu"] = per_device * self.flops["train"] / self.peak_flops
        if trainer.strategy.root_device.type == "cuda":
            metrics["perf/peak_memory_gb"] = torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 2**30
        for reason, count in bad_samples.items():  # reason sets may differ per rank
            metrics[f"data/bad_samples/{reason}"] = float(count)
        self.last_metrics = metrics
        if trainer.global_rank == 0:
            # Straight to the loggers: self.log would hold step 1 back until log_every_n_steps.
            for logger in trainer.loggers:  # the row of the step just done (= the optimizer steps so far)
                logger.log_metrics(metrics, step=trainer.global_step)
        self._reset_window()
