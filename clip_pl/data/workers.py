"""How every DataLoader of the project (training, validation, evaluation) starts its workers.

Where from: a forkserver, not a fork of the training process. A rank's process has threads that are not
Python's (gloo's run loops, NCCL's watchdog), and a fork copies whatever lock such a thread held at that
instant. Seen here: about one run in a dozen of a test that starts 24 workers under two gloo ranks hung
for good, a new worker stuck inside ``os.fork`` (``PyOS_AfterFork_Child`` →
``_PyThreadState_DeleteExcept``) waiting for the interpreter's thread-list lock, which a
``pt_gloo_runloop`` thread had held when the rank forked; its rank then waited for that worker's batch
and the other ranks in the next collective, forever. The forkserver is a fresh single-threaded process
(one per rank, started at the datamodule's setup or the first loader with workers) that has imported the
loader's modules once (:mod:`clip_pl.data.forkserver_preload`); workers forked from it start in
milliseconds and inherit no lock. ``data.multiprocessing_context=fork`` restores the old way.

What they do with signals: SLURM signals every process of the step, and a forked worker inherits the
training process's Python signal handlers. The workers (and the forkserver) leave SIGUSR1 / SIGTERM to
the training process, where ``clip_pl.callbacks.preemption.PreemptionCheckpoint`` turns them into a save
at a step boundary. Because they ignore SIGTERM, multiprocessing's own exit handler (SIGTERM to daemon
children, then join) would wait forever for the workers of a loader still alive at interpreter exit
(a loader or iterator held by a module-level name of a script); an exit hook ends them first.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util
import os
import signal
import time
from typing import Any

START_METHOD = "forkserver"
_START_METHODS = ("forkserver", "spawn", "fork")


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


def check_start_method(method: str | None) -> None:
    """Refuse an unknown ``data.multiprocessing_context`` at construction, before any work."""
    available = [m for m in _START_METHODS if m in multiprocessing.get_all_start_methods()]
    if method is not None and method not in available:
        raise ValueError(
            f"data.multiprocessing_context={method!r}: one of {available} "
            "(forkserver unless you know why; see clip_pl/data/workers.py)."
        )


def worker_context(method: str | None = START_METHOD):
    """The multiprocessing context DataLoader workers start from (None: torch's default, i.e. fork).

    For forkserver and spawn it also starts, now, the helper processes they need: the forkserver
    (which then imports the loader's modules while this process goes on) and multiprocessing's
    resource tracker. Safe in a process with threads: both start by fork + exec, no Python in between."""
    check_start_method(method)
    if method is None:
        return None
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        # Read when this process's forkserver starts (its first loader with workers); the same list each time.
        context.set_forkserver_preload(_preload())
    if method in ("forkserver", "spawn"):
        _start_helpers(method)
    return context


def _start_helpers(method: str) -> None:
    """Start the resource tracker (and the forkserver) with SIGUSR1/SIGTERM blocked.

    SLURM signals every process of the step. The tracker ignores SIGTERM but not SIGUSR1: killed, it
    is relaunched with an empty registry and prints a traceback for every semaphore freed after, and
    what it tracked may leak. A signal mask survives fork + exec, so blocked here, the signals never
    reach the helpers; this thread only holds them back for these milliseconds (Python's handlers run
    in the main thread whichever thread the signal lands on, and nothing is lost)."""
    from multiprocessing import forkserver, resource_tracker

    stops = {signal.SIGUSR1, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        resource_tracker.ensure_running()
        if method == "forkserver":
            forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _preload() -> list[str]:
    """What the forkserver imports before its first fork. Each worker, like a spawned process, first
    re-runs the main module as ``__mp_main__`` (so a script that builds loaders needs the usual
    ``if __name__ == "__main__":`` guard); with the modules it imports already loaded in the server,
    that re-run costs milliseconds, not seconds."""
    import sys

    modules = ["__main__"]  # a script run by path: multiprocessing imports it in the server itself
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(main_spec, "name", None)
    if name and not name.endswith("__main__"):  # `python -m clip_pl.train`
        modules.append(name)
    return [*modules, "clip_pl.data.forkserver_preload"]


def stop_workers_left_running(grace_s: float = 1.0) -> None:
    """At interpreter exit, before multiprocessing's handler (atexit runs the later registration first):
    do what that handler does to daemon children (DataLoader workers are daemons), SIGTERM, then kill
    those still alive after ``grace_s``. Ours ignore SIGTERM, and the handler would join them forever.
    A worker only reads and decodes: killing it loses nothing; another daemon still gets its SIGTERM."""
    daemons = [child for child in multiprocessing.active_children() if child.daemon]
    for child in daemons:
        child.terminate()
    deadline = time.monotonic() + grace_s
    for child in daemons:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join(grace_s)


def worker_options(num_workers: int, rank: int = 0, method: str | None = START_METHOD) -> dict[str, Any]:
    """DataLoader keyword arguments for ``num_workers`` workers: where they start from, and their init."""
    if num_workers == 0:
        return {}
    # Once per process however many loaders (unregister drops an earlier registration); multiprocessing.util,
    # imported above, registered its own handler before, so this one runs first.
    atexit.unregister(stop_workers_left_running)
    atexit.register(stop_workers_left_running)
    return {"multiprocessing_context": worker_context(method), "worker_init_fn": WorkerInit(rank)}
