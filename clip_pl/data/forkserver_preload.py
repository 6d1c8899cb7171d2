"""Imported by the forkserver that DataLoader workers are forked from (:func:`clip_pl.data.workers.worker_context`).

Only there does it do anything:

- it imports what every worker needs, once: a fork of the server then starts a worker in
  milliseconds, where each worker importing torch and the loader itself would take seconds;
- the server ignores SIGUSR1 and SIGTERM. SLURM signals every process of the step, and a server
  killed by one makes each worker it started look dead to its DataLoader ("worker exited
  unexpectedly") although they run on; its workers inherit the same (they ignore them anyway).
"""

from __future__ import annotations

import sys


def in_forkserver() -> bool:
    # multiprocessing starts its server as `python -c 'from multiprocessing.forkserver import main; main(…)'`.
    return any("multiprocessing.forkserver import main" in arg for arg in getattr(sys, "orig_argv", ()))


if in_forkserver():
    import warnings

    from clip_pl.data.workers import ignore_stop_signals

    ignore_stop_signals()
    # The server imported the main module (`python -m clip_pl.train`) on purpose, so that each worker's re-run
    # of it as __mp_main__ finds its imports loaded; runpy warns about exactly that, once per worker.
    warnings.filterwarnings(
        "ignore", message=r"'.*' found in sys.modules after import of package", category=RuntimeWarning
    )
    # WorkerInit seeds each worker as Lightning would (seed_everything(workers=True)); unloaded, that import
    # alone made every worker of every fit start 3 s late.
    import lightning.fabric.utilities.seed  # noqa: F401
    import open_clip.tokenizer  # noqa: F401  (the loaders' tokenizer comes pickled with the dataset)
    import torch  # noqa: F401

    import clip_pl.data.stream  # noqa: F401  (and through it the decoders and the batch transform)
