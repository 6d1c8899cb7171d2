"""Small callbacks of the training loop: a run's event log, the gradient norm, a test-only throttle."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L
import torch

from clip_pl.strategies import is_deepspeed
from clip_pl.towers import base_lr


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
        lr = base_lr(trainer.optimizers[0]) if trainer.optimizers else None
        self._write(trainer, "start", resumed_from=trainer.ckpt_path, lr=lr)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # preempted_at_step: the step whose hpc_ckpt this attempt saved before stopping (None: not preempted)
        preempted = next(
            (cb.stopped_at_step for cb in trainer.callbacks if getattr(cb, "stopped_at_step", None) is not None), None
        )
        self._write(trainer, "end", preempted_at_step=preempted)


class GradNorm(L.Callback):
    """Logs ``train/grad_norm``: the L2 norm of the whole gradient, before clipping, every
    ``log_every_n_steps`` steps, the same number under every strategy.

    DDP holds full gradients; FSDP2 holds DTensor shards whose norm is reduced over the ranks; ZeRO
    2/3 hold no ``.grad`` at all, so there the norm DeepSpeed computed for its own step is read.
    """

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if _deepspeed_engine(trainer) is not None or (trainer.global_step + 1) % trainer.log_every_n_steps:
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            pl_module.log("train/grad_norm", norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        engine = _deepspeed_engine(trainer)
        if engine is not None and trainer.global_step % trainer.log_every_n_steps == 0:
            norm = engine.get_global_grad_norm()
            if norm is not None:
                pl_module.log("train/grad_norm", float(norm))


def _deepspeed_engine(trainer: L.Trainer):
    return trainer.strategy.deepspeed_engine if is_deepspeed(trainer.strategy) else None


class StepSleep(L.Callback):
    """Sleeps after every training step: lets the preemption tests catch a short run mid-way."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)
