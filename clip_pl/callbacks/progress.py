"""The progress bar: Lightning's, plus throughput and the time left, as Telemetry measures them."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from clip_pl.callbacks.telemetry import Telemetry


class ThroughputProgressBar(TQDMProgressBar):
    """Lightning's progress bar, plus samples/s and the time left to ``max_steps``."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        telemetry = next((c for c in trainer.callbacks if isinstance(c, Telemetry)), None)
        metrics = getattr(telemetry, "last_metrics", None)
        if metrics:
            items["samples/s"] = f"{metrics['perf/samples_per_s']:.0f}"
            if trainer.max_steps > 0:
                eta_s = (trainer.max_steps - trainer.global_step) * metrics["perf/step_time_s"]
                items["eta"] = time.strftime("%H:%M:%S", time.gmtime(max(0.0, eta_s)))
        return items
