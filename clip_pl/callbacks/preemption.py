"""Preemption that holds at 256 ranks: a signal only sets a flag; the ranks agree at a step boundary,
save together, and rank 0 requeues.

    sbatch slurm/train_256gpu.sh …            # --signal=SIGUSR1@120 --requeue: SIGUSR1 → save → requeue
    scancel --signal=USR1 <job>               # the same by hand
    scancel --signal=TERM <job>               # what preemption by a higher-priority job sends: save, stop

Why not Lightning's own ``SLURMEnvironment(auto_requeue=True)``: it saves the checkpoint *inside*
the signal handler, on every rank, wherever each rank is (Lightning #21406). With DDP the save's
barrier then pairs with another rank's gradient all-reduce; with DeepSpeed/FSDP the gathers of a
sharded save pair with anything. The result is a hang (rank 0 never requeues, the job dies at its
time limit) or a checkpoint from the middle of an optimizer step. Its SIGTERM handler even runs a
``broadcast`` inside the handler. So here:

1. The handler (SIGUSR1 and SIGTERM, main process only) records the signal and returns.
2. After every optimizer step (``on_train_batch_end``) the ranks all-reduce (MAX) one 2-int tensor:
   [requeue asked, stop asked]. Every rank reaches this point at the same step, so they all see
   the same answer at the same step, whichever rank (or ranks) got the signal and when.
3. If set, every rank calls ``trainer.save_checkpoint`` together (collective-safe for DDP, DeepSpeed,
   FSDP) into ``hpc_ckpt_<global_step>.ckpt``: the name comes from the step, identical on all ranks.
   Folder checkpoints (DeepSpeed, sharded FSDP) are written to a temporary folder and renamed.
4. The trainer stops. When the whole fit is torn down, rank 0 runs ``scontrol requeue $SLURM_JOB_ID``
   for SIGUSR1 (the time-limit warning). SIGTERM only saves and stops: it is what SLURM sends when
   a higher-priority job preempts this one (its PreemptMode decides whether the job is requeued) and
   also what ``scancel`` sends, which must cancel, not requeue.

DataLoader workers ignore both signals (``clip_pl.data.workers.WorkerInit``, their ``worker_init_fn``):
a forked worker inherits the parent's Python handlers, and SLURM signals every process of the step.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from clip_pl.checkpointing import save_checkpoint_atomically

log = logging.getLogger(__name__)

_INDEX = {"requeue": 0, "stop": 1}


def slurm_job_id() -> str | None:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class PreemptionCheckpoint(L.Callback):
    """Signals → flag; all ranks agree after the optimizer step, save ``hpc_ckpt_<step>.ckpt``, stop;
    rank 0 requeues (SIGUSR1 only). See the module docstring for why.

    ``dirpath``: where the hpc checkpoints go (default: ``trainer.default_root_dir``, the run
    directory, where ``resume=auto`` looks). ``requeue_signals`` / ``stop_signals``: names of the
    signals that save + requeue / save + stop. ``requeue_command``: argv run by rank 0 (default
    ``scontrol requeue <job id>``; nothing outside SLURM).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        requeue_signals: Sequence[str] = ("SIGUSR1",),
        stop_signals: Sequence[str] = ("SIGTERM",),
        requeue_command: Sequence[str] | None = None,
    ) -> None:
        self.dirpath = dirpath
        self.requeue_signals = tuple(
            signal.Signals[s] if isinstance(s, str) else signal.Signals(s) for s in requeue_signals
        )
        self.stop_signals = tuple(signal.Signals[s] if isinstance(s, str) else signal.Signals(s) for s in stop_signals)
        self.requeue_command = list(requeue_command) if requeue_command else None
        self._asked = [0, 0]  # [requeue, stop]: written by the handler, read at step boundaries
        self._originals: dict[int, Any] = {}
        self.stopped_at_step: int | None = None  # set on every rank once the ranks agreed to stop
        self.saved_path: str | None = None
        self.requeue_result: int | None = None
        self._requeue = False

    # ---- signal side: record only -----------------------------------------------------------
    def _on_signal(self, signum: int, frame) -> None:
        # Runs between two bytecodes of whatever the main thread was doing, possibly inside a
        # collective or a checkpoint write: no I/O, no collectives, no locks. Just remember it.
        self._asked[_INDEX["requeue" if signum in self.requeue_signals else "stop"]] = 1

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal only works there; Lightning's loops run there
        for signum in (*self.requeue_signals, *self.stop_signals):
            current = signal.getsignal(signum)
            if current != self._on_signal:
                self._originals.setdefault(signum, current)
                signal.signal(signum, self._on_signal)

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._originals.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._originals = {}

    @property
    def stop_requested(self) -> bool:
        """This process got a stop signal that the ranks have not acted on yet."""
        return any(self._asked)

    # ---- Lightning hooks --------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._asked = [0, 0]
        self.stopped_at_step = self.saved_path = self.requeue_result = None
        self._requeue = False
        self._install()
        # Lightning registers its own SIGTERM handler (it broadcasts inside the handler) when the
        # fit starts, after this hook: put ours back right after it does.
        connector = getattr(trainer, "_signal_connector", None)
        register = getattr(connector, "register_signal_handlers", None)
        if register is not None and not getattr(register, "_clip_pl_wrapped", False):

            def register_then_ours() -> None:
                register()
                self._install()

            register_then_ours._clip_pl_wrapped = True  # type: ignore[attr-defined]
            connector.register_signal_handlers = register_then_ours  # type: ignore[union-attr]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()  # in case the trainer registered handlers without the hook above

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        # After the optimizer step of this batch: every rank is here at the same global step.
        asked = self._agree(trainer)
        if not any(asked):
            return
        step = trainer.global_step
        reason = "SIGUSR1 (time limit)" if asked[0] else "SIGTERM (preemption)"
        if trainer.is_global_zero:
            log.warning(
                "Stop requested by %s: all %d ranks save at step %d, then stop.", reason, trainer.world_size, step
            )
        path = Path(self.dirpath or trainer.default_root_dir) / f"hpc_ckpt_{step}.ckpt"
        save_checkpoint_atomically(trainer, path)
        self.saved_path, self.stopped_at_step = str(path), step
        finished = trainer.max_steps is not None and 0 <= trainer.max_steps <= step
        self._requeue = bool(asked[0]) and not finished
        self._asked = [0, 0]
        trainer.should_stop = True

    def _agree(self, trainer: L.Trainer) -> list[int]:
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            # One process agrees with itself. No device tensor: its round trip (.tolist()) would make
            # the CPU wait for the GPU at every step, so it could not queue the next step meanwhile.
            return list(self._asked)
        flags = torch.tensor(self._asked, dtype=torch.int32, device=trainer.strategy.root_device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return [int(v) for v in flags.tolist()]

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Last: metrics, events and checkpoints are all written; the requeue kills the step.
        try:
            if self._requeue and trainer.is_global_zero:
                self.requeue_result = self._run_requeue()
        finally:
            self._requeue = False
            self._restore()

    def _run_requeue(self) -> int | None:
        command = self.requeue_command
        if command is None:
            job_id = slurm_job_id()
            if job_id is None:
                log.warning("Stopped for SIGUSR1 outside SLURM: nothing to requeue. Resume with resume=auto.")
                return None
            if not re.fullmatch(r"[0-9_]+", job_id):
                raise ValueError(f"unexpected SLURM job id {job_id!r}")
            command = ["scontrol", "requeue", job_id]
        log.info("Requeuing: %s", " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode == 0:
            log.info("Requeued (%s).", " ".join(command))
        else:
            log.warning("%s failed (%d): %s", " ".join(command), result.returncode, result.stderr.strip())
        return result.returncode
