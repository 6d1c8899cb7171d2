"""model.compile=true (torch.compile of the model, in place) trains like the eager model."""

from __future__ import annotations

import csv

import pytest

from clip_pl.train import train
from tests.support.config import CPU_TINY, make_cfg

# Compares two computations of the same numbers (marker numerics).
pytestmark = pytest.mark.numerics


def losses(tmp_path, compile_model: bool) -> list[float]:
    cfg = make_cfg(
        [
            *CPU_TINY,
            "data.batch_size=8",
            "trainer.max_steps=3",
            "scheduler.warmup_steps=1",
            "trainer.log_every_n_steps=1",
            "callbacks.checkpoint.every_n_train_steps=0",
            f"model.compile={str(compile_model).lower()}",
            f"run_name=compile-{compile_model}",
        ],
        tmp_path,
    )
    train(cfg)
    with open(tmp_path / "runs" / f"compile-{compile_model}" / "csv" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("train/loss")]
    return [float(r["train/loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


@pytest.mark.slow
def test_a_compiled_model_follows_the_eager_loss_curve(tmp_path):
    from torch._dynamo.utils import counters

    eager = losses(tmp_path, False)
    counters.clear()
    compiled = losses(tmp_path, True)
    assert counters["stats"]["unique_graphs"] > 0  # dynamo really traced the model
    assert len(eager) == len(compiled) == 3
    assert compiled == pytest.approx(eager, rel=1e-4)  # inductor reorders float sums, nothing more
