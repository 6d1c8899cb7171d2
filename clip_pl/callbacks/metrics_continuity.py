"""A resumed run's CSV log continues from the resumed step (see ``clip_pl.csv_metrics``)."""

from __future__ import annotations

import lightning as L

from clip_pl.csv_metrics import ContinuingCSVLogger


class ContinueMetrics(L.Callback):
    """At train start (after any checkpoint is restored), trim the CSV log to the resumed step."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        for logger in trainer.loggers:
            if isinstance(logger, ContinuingCSVLogger):
                logger.experiment.continue_from(trainer.global_step)
