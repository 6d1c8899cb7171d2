"""The real entry point on 1 process and on 2 DDP processes (gloo) at the same global batch:
the same samples per step, so the same loss curve (the first step's loss exactly)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

# Compares two computations of the same numbers: also run under ATEN_CPU_CAPABILITY=avx2 in CI (.ci/run).
pytestmark = pytest.mark.numerics

REPO = Path(__file__).resolve().parents[1]


def loss_curve(tmp_path: Path, devices: int, global_batch: int = 8, steps: int = 3) -> list[float]:
    command = [
        sys.executable,
        "-m",
        "clip_pl.train",
        "debug=smoke",
        f"trainer.devices={devices}",
        f"global_batch_size={global_batch}",
        f"trainer.max_steps={steps}",
        "scheduler.warmup_steps=1",
        "trainer.log_every_n_steps=1",
        f"paths.root_dir={tmp_path}",
        f"run_name=devices{devices}",
        "callbacks.checkpoint.every_n_train_steps=0",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "runs" / f"devices{devices}" / "csv" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("train/loss")]
    return [float(r["train/loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


@pytest.mark.slow  # three interpreters (1 + 2 DDP ranks) start the entry point: ~50 s on 2 loaded cores
def test_ddp_on_two_processes_follows_the_single_process_loss_curve(tmp_path):
    one = loss_curve(tmp_path, devices=1)
    two = loss_curve(tmp_path, devices=2)
    assert len(one) == len(two) == 3
    assert two[0] == pytest.approx(one[0], rel=1e-6)  # identical global batch, identical weights
    assert two == pytest.approx(one, rel=1e-4)  # identical averaged gradients, steps stay in step
