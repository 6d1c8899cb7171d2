"""Checkpoints that survive crashes, and the choice of which one a (re)started run resumes from.

The callbacks that decide *when* to save are ``clip_pl.callbacks.checkpoint.StepCheckpoint`` (every n
steps and the final step) and ``clip_pl.callbacks.preemption.PreemptionCheckpoint`` (on a signal).
"""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from clip_pl.strategies import is_deepspeed


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


def writes_folders(strategy) -> bool:
    """Whether ``strategy.save_checkpoint`` writes a folder, every rank its part (DeepSpeed, sharded FSDP,
    distributed ModelParallel) rather than one file from rank 0."""
    if is_deepspeed(strategy):
        return True
    if getattr(strategy, "_state_dict_type", None) == "sharded":
        return True
    return bool(getattr(strategy, "_save_distributed_checkpoint", False))


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_path(tmp: Path, target: Path) -> None:
    """Put ``tmp`` (a file or a folder) at ``target``; a reader sees the old or the new one, whole.

    A folder cannot be renamed over a non-empty folder, so an existing target is swapped with the new
    one atomically where the file system supports it (renameat2 RENAME_EXCHANGE: ext4, xfs, tmpfs,
    btrfs …); elsewhere it is moved aside to ``.NAME.prev`` first, which :func:`find_resume_checkpoint`
    also accepts, so even a crash between the two renames leaves a checkpoint to resume from.
    """
    tmp, target = Path(tmp), Path(target)
    if not target.exists() and not target.is_symlink():
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):
        _remove(tmp)  # now holds the previous checkpoint
        return
    previous = target.with_name(f".{target.name}.prev")
    _remove(previous)
    os.rename(target, previous)
    os.rename(tmp, target)
    _remove(previous)


def save_checkpoint_atomically(trainer, path: str | os.PathLike, weights_only: bool | None = None) -> None:
    """``trainer.save_checkpoint`` on every rank, never leaving a half-written checkpoint at ``path``.

    Single files are made atomic by :class:`AtomicCheckpointIO`. Folder checkpoints (DeepSpeed, sharded
    FSDP) are written by every rank into ``.NAME.tmp-<step>`` (the same name on all ranks: it comes
    from the step), and rank 0 swaps that folder in once all ranks are done.
    """
    path = Path(path)
    if not writes_folders(trainer.strategy):
        trainer.save_checkpoint(str(path), weights_only)
        return
    tmp = path.with_name(f".{path.name}.tmp-{trainer.global_step}")
    if trainer.is_global_zero:
        _remove(tmp)  # a leftover of a save that was killed
        tmp.parent.mkdir(parents=True, exist_ok=True)
    trainer.strategy.barrier("clip_pl.save_checkpoint_atomically.prepare")
    trainer.save_checkpoint(str(tmp), weights_only)  # collective; ends with a barrier
    if trainer.is_global_zero:
        replace_path(tmp, path)
        for leftover in path.parent.glob(f".{path.name}.tmp-*"):  # of saves that were killed
            _remove(leftover)
    trainer.strategy.barrier("clip_pl.save_checkpoint_atomically.commit")


def find_resume_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The newest checkpoint of a run: Lightning's SLURM requeue checkpoints (``hpc_ckpt_*.ckpt``,
    written on SIGUSR1) and our ``checkpoints/last.ckpt``, whichever was written last. Under
    DeepSpeed (and sharded FSDP) a checkpoint is a folder; it counts the same."""
    candidates = glob.glob(os.path.join(run_dir, "hpc_ckpt_*.ckpt"))
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    previous = os.path.join(run_dir, "checkpoints", ".last.ckpt.prev")  # see replace_path
    if os.path.exists(last):
        candidates.append(last)
    elif os.path.exists(previous):
        candidates.append(previous)
    return max(candidates, key=os.path.getmtime) if candidates else None
