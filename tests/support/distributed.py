"""Run a function in W real processes joined by a gloo process group (CPU), collect the results.

    results = run_distributed(fn, world_size=2, args=(x,))   # fn(rank, world_size, *args) -> picklable

The parent hosts the rendezvous store (a ``TCPStore`` bound to port 0, so the operating system
picks a free port and the store holds it from then on: no "find a free port, release it, hope
nobody takes it before rank 0 binds it" race); each worker joins the gloo process group through
that store, runs ``fn``, destroys the group, then leaves with ``os._exit(0)``: with torch 2.14.1,
spawned gloo workers sometimes abort at interpreter exit after ``destroy_process_group`` (see
DESIGN.md), which would flake the tests although the work is done.

The ranks start from a forkserver, not by spawn: a spawned rank imported torch, Lightning and clip_pl
again to unpickle ``fn`` (~7 s of CPU each, ~60 ranks in `make test`; this and two smaller changes took the
suite's CPU on 2 cores down by 17 %).
The server (one per test process, multiprocessing's own) imports them once; a rank forked from it starts
in milliseconds. It is a fresh single-threaded process, so the fork copies no lock held by a thread
(clip_pl/data/workers.py), and each rank takes the parent's current environment, working directory and
signal mask, and default stop signals, as a spawned one would.
"""

from __future__ import annotations

import io
import os
import queue as queue_module
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def rendezvous_store():
    """A TCPStore on 127.0.0.1 bound to a port the OS picks, held open by this (parent) process."""
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def _to_bytes(obj: Any) -> bytes:
    # Plain bytes, not tensors: torch's queue would pass tensors as shared-memory handles that
    # die with the worker, which leaves with os._exit right after.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


# What the server imports before its first fork. clip_pl.data.forkserver_preload makes it fit for the
# DataLoader workers of tests that run loaders in the test process (the server is multiprocessing's one).
_PRELOAD = ["torch", "torch.distributed", "lightning", "clip_pl.train", "clip_pl.data.forkserver_preload"]


def _as_if_spawned(environ: dict[str, str], cwd: str, signal_mask: set) -> None:
    """A rank gets what a spawned one has: the test process's environment, working directory and signal
    mask of now, and default stop signals. The server started with the environment of an earlier moment;
    it ignores SIGUSR1/SIGTERM for the loader workers' sake (clip_pl.data.forkserver_preload), and when a
    loader started it (clip_pl.data.workers.worker_context) it even has them blocked, a mask its forks
    inherit: a rank that kept it would never see the signals the preemption tests send it."""
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, signal_mask)


def _worker(
    rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue, timeout: float, parent: tuple
) -> None:
    import faulthandler

    import torch
    import torch.distributed as dist

    _as_if_spawned(*parent)

    # A rank still running shortly before the parent gives up prints every thread's stack to stderr
    # (pytest shows it with the failure): a hang then says where it is.
    faulthandler.enable()  # and a rank killed by SIGSEGV / SIGABRT prints its stack before it dies
    faulthandler.dump_traceback_later(max(timeout - 15, 1), exit=False)
    torch.set_num_threads(1)  # W processes share 2 cores; oversubscription makes tests crawl
    # What a launcher (srun, torchrun) would set; Lightning reads them to see that the process
    # group exists already. MASTER_PORT is the parent's store, which nobody else can bind.
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        dist.barrier()
        dist.destroy_process_group()
        queue.put((rank, "ok", _to_bytes(result)))
    except BaseException:  # report any failure to the parent instead of hanging it
        queue.put((rank, "error", traceback.format_exc()))
    queue.close()
    queue.join_thread()  # the queue's feeder thread must flush before os._exit, or the result is lost
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable, world_size: int, args: tuple = (), timeout: float = 300.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # read when this process's server starts; the same list each time
    queue = ctx.Queue()
    store = rendezvous_store()  # kept alive (and its port held) until every worker is done
    port = store.port
    parent = (dict(os.environ), os.getcwd(), signal.pthread_sigmask(signal.SIG_BLOCK, ()))
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, timeout, parent))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size and not errors:
            try:
                rank, status, payload = queue.get(timeout=1.0)
            except queue_module.Empty:
                errors.extend(_silent_deaths(procs, results, queue, deadline))
                continue
            if status == "ok":
                results[rank] = _from_bytes(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        del store
    if errors:
        raise RuntimeError("distributed worker failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def _silent_deaths(procs, results: dict, queue, deadline: float) -> list[str]:
    """Ranks that left without a report (killed by a signal, aborted in C++), or the timeout: a rank that
    reported put its result on the queue before exiting, so one that is gone and silent died."""
    gone = [r for r, p in enumerate(procs) if r not in results and p.exitcode is not None]
    if gone:
        time.sleep(2)  # a report written just before the exit may still be on its way
        if not queue.empty():
            return []
        return [
            f"rank {r} exited with code {procs[r].exitcode} without reporting"
            f"{f' (killed by signal {-procs[r].exitcode})' if procs[r].exitcode < 0 else ''};"
            " its stderr (above, in pytest's captured output) has faulthandler's traceback if it crashed"
            for r in gone
        ]
    if time.monotonic() > deadline:
        alive = [r for r, p in enumerate(procs) if p.is_alive()]
        return [f"timed out: ranks {alive} still running (their stacks were dumped to stderr shortly before)"]
    return []
