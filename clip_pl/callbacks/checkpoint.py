"""Periodic and final checkpoints: Lightning's ModelCheckpoint, made atomic for folder checkpoints."""

from __future__ import annotations

import weakref

from lightning.pytorch.callbacks import ModelCheckpoint

from clip_pl.checkpointing import save_checkpoint_atomically, writes_folders


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus the final step: a run whose ``max_steps`` is not a multiple
    of ``every_n_train_steps`` still ends with ``step=N.ckpt`` and a ``last.ckpt`` of all N steps
    (Lightning's own end-of-training save only happens when no ``last`` was ever written).

    A run stopped by preemption (:class:`clip_pl.callbacks.preemption.PreemptionCheckpoint`) has just saved its
    ``hpc_ckpt``: no final checkpoint then, the run is not over. Folder checkpoints (DeepSpeed) are
    written aside and swapped in, so ``last.ckpt`` is never a mix of two steps.
    """

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        if not writes_folders(trainer.strategy):
            return super()._save_checkpoint(trainer, filepath)
        save_checkpoint_atomically(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(weakref.proxy(self))

    def on_train_end(self, trainer, pl_module) -> None:
        if any(getattr(cb, "stopped_at_step", None) is not None for cb in trainer.callbacks):
            return  # preempted: the hpc checkpoint of this step is the resume point
        if (
            self._every_n_train_steps
            and not trainer.fast_dev_run
            and trainer.global_step > 0
            and self._last_global_step_saved != trainer.global_step
        ):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
