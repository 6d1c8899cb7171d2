"""Telemetry: the FLOPs count against a hand count, MFU from the per-device table, and what a real
(CPU) run logs: throughput and MFU against a hand count of the tiny model, evaluation kept out of
the throughput window, and a data wait that a slow loader raises and a slow step does not."""

from __future__ import annotations

import csv
import time

import lightning
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from clip_pl.callbacks.evaluation import _PeriodicEvaluation
from clip_pl.callbacks.telemetry import peak_flops_per_device, train_flops_per_sample
from clip_pl.data.synthetic import SyntheticDataModule
from clip_pl.model import resolve_model_config
from clip_pl.module import CLIPModule
from tests.support.config import CPU_TINY, make_cfg


def transformer_block_flops(tokens: int, width: int, mlp_ratio: float) -> int:
    """Multiply-adds ×2 of one pre-norm block: qkv, attention scores and mix, out-proj, MLP."""
    qkv = 2 * tokens * width * 3 * width
    attention = 2 * tokens * tokens * width * 2
    out_proj = 2 * tokens * width * width
    mlp = 2 * 2 * tokens * width * int(mlp_ratio * width)
    return qkv + attention + out_proj + mlp


def test_flops_per_sample_match_a_hand_count():
    image, patch, width, embed = 32, 8, 32, 16
    cfg = resolve_model_config(
        arch_config=dict(
            embed_dim=embed,
            vision_cfg=dict(image_size=image, patch_size=patch, width=width, layers=2, head_width=16),
            text_cfg=dict(context_length=8, vocab_size=100, width=24, heads=2, layers=3),
        )
    )
    patches = (image // patch) ** 2
    patch_embedding = 2 * patches * (3 * patch * patch) * width
    vision = patch_embedding + 2 * transformer_block_flops(patches + 1, width, 4.0) + 2 * width * embed
    text = 3 * transformer_block_flops(8, 24, 4.0) + 2 * 24 * embed  # the projection of the EOT token only
    flops = train_flops_per_sample(cfg)
    assert flops["forward"] == vision + text
    # Backward = 2× forward, except that nothing needs the gradient of the input pixels.
    assert flops["train"] == 3 * flops["forward"] - patch_embedding


def test_peak_flops_come_from_the_device_table():
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989.4e12
    assert peak_flops_per_device("NVIDIA H100 PCIe", "bf16-mixed") == 756.5e12
    assert peak_flops_per_device("NVIDIA A100-SXM4-40GB", "16-mixed") == 312e12
    assert peak_flops_per_device("Some Future Accelerator", "bf16-mixed") is None
    # Longer names first: an "H200 NVL" (or a GH200) is not the SXM H200.
    assert peak_flops_per_device("NVIDIA H200", "bf16-mixed") == 989.4e12
    assert peak_flops_per_device("NVIDIA H200 NVL", "bf16-mixed") == 835.5e12
    assert peak_flops_per_device("NVIDIA GH200 480GB", "bf16-mixed") == 989.4e12


def test_fp32_runs_are_held_to_the_tf32_peak_wherever_tf32_is_allowed(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # PyTorch's default: convolutions in TF32
    torch.set_float32_matmul_precision("highest")
    assert peak_flops_per_device("NVIDIA H200", "32") == 494.7e12
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert peak_flops_per_device("NVIDIA H200", "32") == 66.9e12
    try:
        torch.set_float32_matmul_precision("high")
        assert peak_flops_per_device("NVIDIA H200", "32-true") == 494.7e12
    finally:
        torch.set_float32_matmul_precision("highest")


def tiny_train_flops_by_hand() -> int:
    """clip_pl/conf/model/tiny.yaml counted by hand: 64 px in 8 px patches, widths 128, 3+3 layers, MLP ×2."""
    patches, width, embed = (64 // 8) ** 2, 128, 128
    patch_embedding = 2 * patches * (3 * 8 * 8) * width
    vision = patch_embedding + 3 * transformer_block_flops(patches + 1, width, 2.0) + 2 * width * embed
    text = 3 * transformer_block_flops(32, width, 2.0) + 2 * width * embed
    return 3 * (vision + text) - patch_embedding


class SlowEvaluation(_PeriodicEvaluation):
    """An evaluation callback whose evaluation takes a known second (wrapped in pause_clock by the base)."""

    def __init__(self, every_n_steps: int, seconds: float):
        super().__init__("slow", every_n_steps, at_train_end=False)
        self.seconds = seconds

    def evaluate(self, model, model_config, autocast=None):
        time.sleep(self.seconds)
        return {"done": 1.0}


class BatchEndClock(lightning.Callback):
    """An outside clock: when each step's callbacks (telemetry's log, the evaluation) are done."""

    def __init__(self):
        self.times: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times[trainer.global_step] = time.perf_counter()


def test_a_run_logs_throughput_and_mfu_against_a_hand_count_and_pauses_for_evaluation(tmp_path):
    from clip_pl.train import train

    pause = 1.0
    cfg = make_cfg(
        [
            *CPU_TINY,
            "trainer.max_steps=6",
            "scheduler.warmup_steps=1",
            "trainer.log_every_n_steps=3",
            "callbacks.telemetry.peak_flops_per_device=2e12",
            "callbacks.checkpoint.every_n_train_steps=0",
            f"+callbacks.slow_eval._target_={__name__}.SlowEvaluation",
            "+callbacks.slow_eval.every_n_steps=4",
            f"+callbacks.slow_eval.seconds={pause}",
            f"+callbacks.clock._target_={__name__}.BatchEndClock",
        ],
        tmp_path,
    )
    trainer = train(cfg)
    clock = next(c for c in trainer.callbacks if isinstance(c, BatchEndClock))
    with open(tmp_path / "runs" / "test" / "csv" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("perf/mfu")]
    assert [int(r["step"]) for r in rows] == [1, 3, 6]  # step 1, then every 3 steps
    flops = tiny_train_flops_by_hand()
    for row, steps_in_window in zip(rows, [1, 2, 3]):
        per_device = float(row["perf/samples_per_s_per_device"])
        assert float(row["perf/samples_per_s"]) == pytest.approx(per_device)  # one process
        # samples/s × seconds per step × steps = the samples of the window (4 per step)
        assert per_device * float(row["perf/step_time_s"]) * steps_in_window == pytest.approx(4 * steps_in_window)
        assert float(row["perf/tflops_per_device"]) == pytest.approx(per_device * flops / 1e12, rel=1e-9)
        assert float(row["perf/mfu"]) == pytest.approx(per_device * flops / 2e12, rel=1e-9)
        assert 0.0 <= float(row["perf/data_wait_share"]) < 1.0
    # The window of steps 4-6 holds the 1 s evaluation (after step 4) on the outside clock, not in the
    # logged time: outside minus logged is the pause (a sleep lasts at least its time).
    outside = clock.times[6] - clock.times[3]
    logged = 3 * float(rows[2]["perf/step_time_s"])
    assert 0 < logged < outside
    assert outside - logged >= 0.8 * pause, "evaluation time leaked into the throughput window"


# -- data wait: the time blocked in the loader's next(), nothing else ------------------------------------------

SLEEP_S = 0.2


class SlowLoaderData(SyntheticDataModule):
    """Synthetic pairs whose loader takes ``batch_sleep_s`` per batch, in the training process (no workers)."""

    def __init__(self, batch_sleep_s: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.batch_sleep_s = batch_sleep_s

    def train_dataloader(self) -> DataLoader:
        def slow_collate(samples):
            time.sleep(self.batch_sleep_s)
            return default_collate(samples)

        return DataLoader(super().train_dataloader().dataset, batch_size=self.batch_size, collate_fn=slow_collate)


_training_step = CLIPModule.training_step


def slow_training_step(self, batch, batch_idx):
    time.sleep(SLEEP_S)
    return _training_step(self, batch, batch_idx)


def data_wait_seconds(tmp_path, overrides: list[str]) -> list[tuple[float, int]]:
    """(seconds of data wait, steps) of each whole logged window: the share times the window's time."""
    from clip_pl.train import train

    cfg = make_cfg(
        [
            *CPU_TINY,
            "trainer.max_steps=7",
            "scheduler.warmup_steps=1",
            "trainer.log_every_n_steps=3",
            "callbacks.checkpoint.every_n_train_steps=0",
            "callbacks.progress_bar=null",
            *overrides,
        ],
        tmp_path,
    )
    train(cfg)
    with open(tmp_path / "runs" / "test" / "csv" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("perf/data_wait_share")]
    assert [int(r["step"]) for r in rows] == [1, 3, 6]
    windows = [(rows[1], 2), (rows[2], 3)]  # steps 2-3 and 4-6
    return [(float(r["perf/data_wait_share"]) * float(r["perf/step_time_s"]) * steps, steps) for r, steps in windows]


@pytest.mark.parametrize("slow", ["loader", "training_step", "after_step"])
def test_data_wait_counts_the_loader_and_nothing_else(slow, tmp_path, monkeypatch):
    """A slow loader shows as data wait, second for second; a slow step does not, whether the time
    goes in training_step or after it (a callback that blocks at batch end, like a progress bar's
    .item() waiting for the GPU, or a checkpoint save). Timing the gap between one step's end and
    the next step's start, as before, counted the last as data wait.

    In seconds, not shares: on a loaded 2-core box a tiny step takes anywhere from 20 ms to 2 s."""
    overrides = []
    if slow == "loader":
        overrides = [f"data._target_={__name__}.SlowLoaderData", f"+data.batch_sleep_s={SLEEP_S}"]
    elif slow == "training_step":
        monkeypatch.setattr(CLIPModule, "training_step", slow_training_step)
    else:
        # debug=throttle's setting on top of debug=smoke: clip_pl.callbacks.StepSleep sleeps 0.2 s at each
        # batch end, after Telemetry
        overrides = ["++debug.step_sleep_s=0.2"]
    for wait_s, steps in data_wait_seconds(tmp_path, overrides):
        if slow == "loader":  # every fetch sleeps (a sleep lasts at least its time); a synthetic batch is ms
            assert SLEEP_S * steps <= wait_s < SLEEP_S * steps + 0.1 * steps, (wait_s, steps)
        else:
            assert wait_s < 0.1 * steps, (wait_s, steps)  # the sleeps are not data wait
