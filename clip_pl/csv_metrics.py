"""One CSV metrics log per run, which a restarted (requeued) run continues instead of deleting.

Lightning's CSVLogger deletes an existing ``metrics.csv`` when a new trainer opens the same
folder. Here the file is kept, and when training starts at global step s (a resume), the rows of
steps > s are dropped first (row k is the step that brought global_step to k): the previous
attempt ran them after its last checkpoint and this attempt is about to run them again, so the
file ends as one row per step, start to finish (``clip_pl.callbacks.metrics_continuity.ContinueMetrics``
trims it when training starts).
"""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _ContinuingWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = list(csv.DictReader(handle).fieldnames or [])

    def _check_log_dir_exists(self) -> None:
        pass  # the parent deletes the previous metrics here

    def continue_from(self, global_step: int) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
            kept = [row for row in csv.DictReader(handle) if float(row["step"]) <= global_step]
        with self._fs.open(self.metrics_file_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)


class ContinuingCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment
