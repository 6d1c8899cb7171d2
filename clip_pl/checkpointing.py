"""Checkpoints that survive crashes, and the choice of which one a (re)started run resumes from."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same directory, fsync, then rename over the target.

    A crash or preemption mid-write leaves the previous checkpoint intact (rename is atomic on
    POSIX file systems), never a truncated ``last.ckpt`` that the requeued job would choke on.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r}).")
        path = str(path)
        if get_filesystem(path).protocol not in ("file", ("file", "local")) and "://" in path:
            return super().save_checkpoint(checkpoint, path)  # remote stores: fsspec's own semantics
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus the final step: a run whose ``max_steps`` is not a multiple
    of ``every_n_train_steps`` still ends with ``step=N.ckpt`` and a ``last.ckpt`` of all N steps
    (Lightning's own end-of-training save only happens when no ``last`` was ever written)."""

    def on_train_end(self, trainer, pl_module) -> None:
        if (self._every_n_train_steps and not trainer.fast_dev_run and trainer.global_step > 0
                and self._last_global_step_saved != trainer.global_step):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)


def find_resume_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The newest checkpoint of a run: Lightning's SLURM requeue checkpoints (``hpc_ckpt_*.ckpt``,
    written on SIGUSR1) and our ``checkpoints/last.ckpt``, whichever was written last. Under
    DeepSpeed (and sharded FSDP) a checkpoint is a folder; it counts the same."""
    candidates = glob.glob(os.path.join(run_dir, "hpc_ckpt_*.ckpt"))
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    if os.path.exists(last):
        candidates.append(last)
    return max(candidates, key=os.path.getmtime) if candidates else None
