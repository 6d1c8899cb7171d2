"""Telemetry counts bad samples from the batches it sees, not through the LightningModule."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from clip_pl.callbacks.telemetry import Telemetry


class _Logger:
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))


def test_bad_sample_totals_come_from_the_batches():
    logger = _Logger()
    trainer = SimpleNamespace(
        global_step=0,
        world_size=1,
        global_rank=0,
        loggers=[logger],
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )
    module = object()  # no bad_sample_counts or anything else: the batches are the source
    telemetry = Telemetry(log_every_n_steps=2)
    batches = [
        {"image": torch.zeros(4, 3, 2, 2), "bad_samples": {"skipped/corrupt_image": 1}},
        {"image": torch.zeros(4, 3, 2, 2), "bad_samples": {}},
        {"image": torch.zeros(4, 3, 2, 2), "bad_samples": {"skipped/corrupt_image": 2, "refilled": 3}},
        {"image": torch.zeros(4, 3, 2, 2)},
    ]  # a loader without accounting (synthetic data)
    for index, batch in enumerate(batches):
        telemetry.on_train_batch_start(trainer, module, batch, index)
        trainer.global_step = index + 1
        telemetry.on_train_batch_end(trainer, module, None, batch, index)
    steps = [step for step, _ in logger.rows]
    assert steps == [1, 2, 4]
    last = logger.rows[-1][1]
    assert last["data/bad_samples/skipped/corrupt_image"] == 3.0 and last["data/bad_samples/refilled"] == 3.0
    assert logger.rows[0][1]["data/bad_samples/skipped/corrupt_image"] == 1.0
