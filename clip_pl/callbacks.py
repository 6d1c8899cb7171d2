"""Small callbacks of the training loop: a run's event log and a test-only throttle."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L


class RunEvents(L.Callback):
    """Appends one JSON line per fit start and end to ``events.jsonl`` (rank 0 only).

    A requeued job appends to the same file, so the file tells the run's whole story: where each
    attempt started (global step, checkpoint), on how many ranks, and where it ended.
    """

    def __init__(self, path: str):
        self.path = Path(path)
        self.resumed_from: str | None = None

    def _write(self, trainer: L.Trainer, event: str, **extra) -> None:
        if trainer.global_rank != 0:
            return
        batch_size = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule else None
        record = {
            "event": event,
            "time": time.time(),
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "global_batch_size": batch_size * trainer.world_size if batch_size else None,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            **extra,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        self._write(trainer, "start", resumed_from=trainer.ckpt_path, lr=lr)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # preempted_at_step: the step whose hpc_ckpt this attempt saved before stopping (None: not preempted)
        preempted = next((cb.stopped_at_step for cb in trainer.callbacks
                          if getattr(cb, "stopped_at_step", None) is not None), None)
        self._write(trainer, "end", preempted_at_step=preempted)


class StepSleep(L.Callback):
    """Sleeps after every training step: lets the preemption tests catch a short run mid-way."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)
