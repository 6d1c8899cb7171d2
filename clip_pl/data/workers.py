"""``worker_init_fn`` of every DataLoader of the project (training, validation, evaluation).

SLURM signals every process of the step, and a forked worker inherits the training process's Python
signal handlers: the workers must leave SIGUSR1 / SIGTERM to the training process, where
``clip_pl.callbacks.preemption.PreemptionCheckpoint`` turns them into a save at a step boundary.
"""

from __future__ import annotations

import os
import signal


def ignore_stop_signals() -> None:
    """For DataLoader workers: SIGUSR1 and SIGTERM are the training process's business.

    A worker that ran the inherited handler would take part in a save or a requeue; one killed by
    SIGTERM would crash the rank ("DataLoader worker exited unexpectedly") before it can save. The
    main process ends its workers itself, and SLURM's SIGKILL ends everything at the job's end.
    """
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


class WorkerInit:
    """``worker_init_fn`` of the training loaders: ignore the stop signals, then seed as Lightning
    would (``seed_everything(workers=True)`` only adds its own ``worker_init_fn`` where there is none)."""

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank

    def __call__(self, worker_id: int) -> None:
        ignore_stop_signals()
        if int(os.environ.get("PL_SEED_WORKERS", 0)):
            from lightning.fabric.utilities.seed import pl_worker_init_function
            pl_worker_init_function(worker_id, rank=self.rank)
