"""Telemetry: the FLOPs count against a hand count, MFU from the per-device table, and the
logged throughput/MFU of a real (CPU) run being consistent with each other."""

from __future__ import annotations

import csv

import pytest
import torch

from clip_pl.model import resolve_model_config
from clip_pl.telemetry import peak_flops_per_device, train_flops_per_sample
from tests.test_config import CPU_TINY, make_cfg


def transformer_block_flops(tokens: int, width: int, mlp_ratio: float) -> int:
    """Multiply-adds ×2 of one pre-norm block: qkv, attention scores and mix, out-proj, MLP."""
    qkv = 2 * tokens * width * 3 * width
    attention = 2 * tokens * tokens * width * 2
    out_proj = 2 * tokens * width * width
    mlp = 2 * 2 * tokens * width * int(mlp_ratio * width)
    return qkv + attention + out_proj + mlp


def test_flops_per_sample_match_a_hand_count():
    image, patch, width, embed = 32, 8, 32, 16
    cfg = resolve_model_config(arch_config=dict(
        embed_dim=embed, vision_cfg=dict(image_size=image, patch_size=patch, width=width, layers=2, head_width=16),
        text_cfg=dict(context_length=8, vocab_size=100, width=24, heads=2, layers=3)))
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


def test_a_run_logs_throughput_and_mfu_that_agree(tmp_path):
    from clip_pl.train import train

    cfg = make_cfg([*CPU_TINY, "trainer.max_steps=6", "scheduler.warmup_steps=1", "trainer.log_every_n_steps=3",
                    "callbacks.telemetry.peak_flops_per_device=1e12"], tmp_path)
    train(cfg)
    with open(tmp_path / "runs" / "test" / "csv" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("perf/mfu")]
    assert [int(r["step"]) for r in rows] == [1, 3, 6]  # step 1, then every 3 steps
    flops = train_flops_per_sample(resolve_model_config(**{k: v for k, v in cfg.model.items()}))["train"]
    for row in rows:
        per_device = float(row["perf/samples_per_s_per_device"])
        assert float(row["perf/samples_per_s"]) == pytest.approx(per_device)  # one process
        assert float(row["perf/mfu"]) == pytest.approx(per_device * flops / 1e12, rel=1e-6)
        assert float(row["perf/tflops_per_device"]) == pytest.approx(per_device * flops / 1e12, rel=1e-6)
        assert 0.0 <= float(row["perf/data_wait_share"]) < 1.0
