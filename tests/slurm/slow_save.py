"""A test-only callback for tests/slurm/test_preemption_realistic.py: makes the ``at_save``-th
checkpoint save of the job's first life take ``seconds`` longer on rank 0 and marks it with a file,
so that the test can send SIGUSR1 while a checkpoint is being written. Added to a run with
``+callbacks.slow_save._target_=tests.slurm.slow_save.SlowSave`` (the job runs from the repository)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L


class SlowSave(L.Callback):
    def __init__(self, marker: str, at_save: int = 1, seconds: float = 3.0) -> None:
        self.marker, self.at_save, self.seconds = Path(marker), at_save, seconds
        self.saves = 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_rank != 0 or os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
            return
        self.saves += 1
        if self.saves == self.at_save:
            self.marker.write_text(str(trainer.global_step))
            time.sleep(self.seconds)  # inside trainer.save_checkpoint: the other ranks wait at its barrier
            self.marker.unlink()
