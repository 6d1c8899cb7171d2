"""Preemption on real gloo ranks (clip_pl/callbacks/preemption.py): a signal only sets a flag; the ranks agree at
the step boundary, save together at the same step, and only rank 0 requeues, only for SIGUSR1.

    pytest tests/callbacks/test_preemption.py          # ~1 min on 2 cores

Each case signals the ranks at different steps (or only one rank, or one rank in the middle of a
checkpoint save), as on a real job where no two ranks are at the same line when SIGUSR1 lands.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from torch.utils.data import DataLoader, IterableDataset

from clip_pl.callbacks.checkpoint import StepCheckpoint
from clip_pl.callbacks.preemption import PreemptionCheckpoint
from clip_pl.data.workers import WorkerInit
from tests.support.distributed import run_distributed

REPO = Path(__file__).resolve().parents[2]

MAX_STEPS = 12


class SignalAt(L.Callback):
    """Sends ``signum`` to this process during the training step that makes ``step`` (1-based) on ``rank``."""

    def __init__(self, plan: dict[int, tuple[int, int]]) -> None:
        self.plan = plan  # rank -> (step, signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step, signum = self.plan.get(trainer.global_rank, (None, None))
        if step is not None and trainer.global_step + 1 == step:
            os.kill(os.getpid(), signum)
            time.sleep(0.05)  # the handler has run by now (it runs between bytecodes of the main thread)


class SignalDuringSave(BoringModel):
    """On ``rank``, SIGUSR1 arrives while the periodic checkpoint of ``step`` is being assembled."""

    def __init__(self, rank: int, step: int) -> None:
        super().__init__()
        self.signal_rank, self.signal_step = rank, step

    def on_save_checkpoint(self, checkpoint) -> None:
        if self.trainer.global_rank == self.signal_rank and self.trainer.global_step == self.signal_step:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)


def _fit(rank: int, world_size: int, root: str, plan: dict, save_signal: tuple | None) -> dict:
    torch.manual_seed(0)
    requeue_log = Path(root) / "requeued.txt"
    preemption = PreemptionCheckpoint(dirpath=root, requeue_command=["sh", "-c", f"echo {rank} >> {requeue_log}"])
    callbacks = [
        preemption,
        SignalAt(plan),
        StepCheckpoint(
            dirpath=os.path.join(root, "checkpoints"),
            every_n_train_steps=2,
            save_top_k=-1,
            save_last=True,
            filename="step={step}",
            auto_insert_metric_name=False,
        ),
    ]
    model = SignalDuringSave(*save_signal) if save_signal else BoringModel()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy="ddp",
        max_steps=MAX_STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
    )
    trainer.fit(model)
    return {
        "global_step": trainer.global_step,
        "stopped_at": preemption.stopped_at_step,
        "saved": preemption.saved_path,
        "handler_after": signal.getsignal(signal.SIGUSR1) == preemption._on_signal,
    }


def _run(tmp_path, plan, save_signal=None):
    results = run_distributed(_fit, world_size=2, args=(str(tmp_path), plan, save_signal), timeout=150)
    requeue_log = tmp_path / "requeued.txt"
    requeued = requeue_log.read_text().split() if requeue_log.exists() else []
    return results, requeued


def _assert_saved_together(results, step, tmp_path):
    for r in results:
        assert r["stopped_at"] == step and r["global_step"] == step, results  # same step on every rank
        assert r["saved"] == str(tmp_path / f"hpc_ckpt_{step}.ckpt")
        assert not r["handler_after"]  # handlers restored when the fit is over
    ckpt = torch.load(tmp_path / f"hpc_ckpt_{step}.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == step  # after the optimizer step of `step`, not in the middle of it
    assert not list(tmp_path.glob(".hpc_ckpt_*")) and not list(tmp_path.glob("**/*.tmp-*"))


@pytest.mark.slow
def test_sigusr1_at_different_steps_saves_once_at_the_first_and_rank0_requeues(tmp_path):
    # rank 1 is signalled during step 3, rank 0 only during step 6: both must stop after step 3.
    results, requeued = _run(tmp_path, {0: (6, signal.SIGUSR1), 1: (3, signal.SIGUSR1)})
    _assert_saved_together(results, 3, tmp_path)
    assert requeued == ["0"]  # only rank 0, once
    # preempted: no final step=3 / last checkpoint pretending the run is over (last is step 2's)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 2 and not (tmp_path / "checkpoints" / "step=3.ckpt").exists()


@pytest.mark.slow
def test_sigterm_on_one_rank_saves_on_all_and_does_not_requeue(tmp_path):
    results, requeued = _run(tmp_path, {0: (4, signal.SIGTERM)})
    _assert_saved_together(results, 4, tmp_path)
    assert requeued == []  # SIGTERM (preemption / scancel): SLURM decides, not us


@pytest.mark.slow
def test_sigusr1_during_a_checkpoint_save_is_acted_on_at_the_next_step(tmp_path):
    # rank 1 gets SIGUSR1 while the periodic checkpoint of step 4 is being saved: that save finishes
    # untouched, and all ranks save the hpc checkpoint after step 5.
    results, requeued = _run(tmp_path, {}, save_signal=(1, 4))
    _assert_saved_together(results, 5, tmp_path)
    assert requeued == ["0"]
    periodic = torch.load(tmp_path / "checkpoints" / "step=4.ckpt", map_location="cpu", weights_only=False)
    assert periodic["global_step"] == 4


def _stop_signals_as_a_rank_sees_them(rank: int, world_size: int) -> dict:
    stops = {signal.SIGUSR1, signal.SIGTERM}
    return {
        "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, ()) & stops),
        "default": all(signal.getsignal(s) == signal.SIG_DFL for s in stops),
    }


_RANKS_AFTER_A_LOADER_STARTED_THE_FORKSERVER = """
import json
from clip_pl.data.workers import worker_context
from tests.support.distributed import run_distributed
from tests.callbacks.test_preemption import _stop_signals_as_a_rank_sees_them

worker_context("forkserver")  # as a loader does: the server starts with SIGUSR1/SIGTERM blocked and ignored
print(json.dumps(run_distributed(_stop_signals_as_a_rank_sees_them, world_size=1, timeout=120)))
"""


@pytest.mark.slow  # multi-process or subprocess: > ~10 s on 2 cores (make test-quick leaves it out)
def test_ranks_get_the_stop_signals_even_when_a_loader_started_the_forkserver():
    """The test ranks fork from the test process's forkserver, which a loader test in the same pytest worker
    may have started first, with the stop signals blocked for its workers' sake: a rank that inherited that
    mask let the preemption tests above run to max_steps, the signal pending, on a CI machine whose test
    order differed. In a fresh process, so the order is forced."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _RANKS_AFTER_A_LOADER_STARTED_THE_FORKSERVER],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [{"blocked": [], "default": True}]


def test_signal_only_sets_a_flag():
    cb = PreemptionCheckpoint(requeue_command=["true"])
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    cb._install()
    try:
        assert signal.getsignal(signal.SIGUSR1) == cb._on_signal == signal.getsignal(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert cb._asked == [1, 0] and cb.stop_requested
        os.kill(os.getpid(), signal.SIGTERM)  # would end this pytest process if not handled
        time.sleep(0.01)
        assert cb._asked == [1, 1]
    finally:
        cb._restore()
    assert {s: signal.getsignal(s) for s in before} == before


# ---- DataLoader workers -----------------------------------------------------------------------


class _SignalSelf(IterableDataset):
    """In the worker: send itself the given signals, then report its pid."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)) -> None:
        self.signals = signals

    def __iter__(self):
        for signum in self.signals:
            os.kill(os.getpid(), signum)
        time.sleep(0.05)
        yield os.getpid()


class _NoPosition:
    """What the datamodule's loader sets each epoch; these datasets have no epochs (picklable: the
    workers start from a forkserver and receive the dataset pickled)."""

    def set(self, *args) -> None:
        pass


def _first(batch):
    return batch[0]


def _marker_handler(path: Path):
    def handler(signum, frame):
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {signum}\n")

    return handler


def _load_with_marker_handlers(tmp_path, dataset, worker_init):
    marker = tmp_path / "handled.txt"
    old = {s: signal.signal(s, _marker_handler(marker)) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        loader = DataLoader(
            dataset, batch_size=None, num_workers=1, multiprocessing_context="fork", worker_init_fn=worker_init
        )
        pids = list(loader)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return pids, (marker.read_text().splitlines() if marker.exists() else [])


def test_forked_workers_ignore_stop_signals(tmp_path):
    pids, handled = _load_with_marker_handlers(tmp_path, _SignalSelf(), WorkerInit(0))
    assert len(pids) == 1 and pids[0] != os.getpid() and handled == []


def test_without_worker_init_a_forked_worker_runs_the_parents_handler_or_dies(tmp_path):
    """The control: the two ways the defect shows without WorkerInit."""
    pids, handled = _load_with_marker_handlers(tmp_path, _SignalSelf([signal.SIGUSR1]), None)
    assert handled == [f"{pids[0]} {int(signal.SIGUSR1)}"]  # the trainer's handler, run in the worker
    with pytest.raises(RuntimeError, match="exited unexpectedly"):  # torch's worker SIGTERM handler exits
        _load_with_marker_handlers(tmp_path, _SignalSelf([signal.SIGTERM]), None)


@pytest.mark.slow  # multi-process or subprocess: > ~10 s on 2 cores (make test-quick leaves it out)
def test_datamodule_loaders_ignore_stop_signals_in_workers(tmp_path):
    from clip_pl.data import WebDatasetDataModule

    dm = WebDatasetDataModule(train_shards="unused", num_workers=1, batch_size=1)
    stream = _SignalSelf()
    stream.position = _NoPosition()
    marker = tmp_path / "handled.txt"
    old = {s: signal.signal(s, _marker_handler(marker)) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        loader = dm._loader(stream, lambda: (0, 0))
        pids = list(loader)
        del loader
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    assert len(pids) == 1 and not marker.exists(), marker.read_text() if marker.exists() else ""


_RANK_WITH_WORKERS = """
import json, os, signal, sys, time
from multiprocessing import forkserver, resource_tracker
from tests.support.fake_shards import write_shards
from clip_pl.data import WebDatasetDataModule

def state(pid):  # R, S, Z (dead, not yet reaped) ...
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]

def main():
    write_shards(sys.argv[1], [8, 8], image_px=(32, 32))
    dm = WebDatasetDataModule(train_shards=sys.argv[1], batch_size=2, num_workers=2, image_size=32, prefetch_factor=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    try:
        first = len(list(loader))
        server, tracker = forkserver._forkserver._forkserver_pid, resource_tracker._resource_tracker._pid
        workers = [w.pid for w in loader._iterator._workers]
        parents = [int(open(f"/proc/{w}/stat").read().rsplit(")", 1)[1].split()[1]) for w in workers]
        for pid in (server, tracker, *workers):  # what `scancel --signal=USR1` and a preemption's SIGTERM do
            for signum in (signal.SIGUSR1, signal.SIGTERM):
                os.kill(pid, signum)
        time.sleep(0.5)
        alive = {name: state(pid) != "Z" for name, pid in (("forkserver", server), ("resource tracker", tracker))}
        print(json.dumps({"me": os.getpid(), "server": server, "parents": parents, "alive": alive,
                          "epochs": [first, len(list(loader))]}))
    finally:
        # As Lightning does at a fit's end. Left to interpreter exit, multiprocessing would SIGTERM the
        # workers, which ignore it, and wait for them forever.
        if loader._iterator is not None:
            loader._iterator._shutdown_workers()

main()
"""


@pytest.mark.slow  # multi-process or subprocess: > ~10 s on 2 cores (make test-quick leaves it out)
def test_workers_start_from_a_forkserver_and_the_helpers_outlive_slurms_signals(tmp_path):
    """In a fresh process, as a rank is: the datamodule's workers are not forks of it (a fork there
    can copy a lock that a gloo thread holds, and the worker hangs for good; clip_pl/data/workers.py)
    but of its forkserver. SLURM signals every process of the step: the forkserver and multiprocessing's
    resource tracker must live on (a dead server makes its workers look dead to the loader; a dead
    tracker is relaunched empty and prints a traceback per semaphore), and the workers too."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _RANK_WITH_WORKERS, str(tmp_path / "shards")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["parents"] == [report["server"]] * 2 and report["server"] != report["me"]
    assert report["alive"] == {"forkserver": True, "resource tracker": True}
    assert report["epochs"] == [8, 8]  # the persistent workers served the epoch after the signals
    assert "Traceback" not in out.stderr and "resource_tracker" not in out.stderr, out.stderr[-3000:]


_SCRIPT_LEAVING_A_LOADER = """
import sys
from tests.support.fake_shards import write_shards
from clip_pl.data import WebDatasetDataModule

if __name__ == "__main__":
    write_shards(sys.argv[1], [8, 8], image_px=(32, 32))
    dm = WebDatasetDataModule(train_shards=sys.argv[1], batch_size=2, num_workers=2, image_size=32)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = iter(loader)  # a module-level name: alive at interpreter exit, its workers running
    print(next(batches)["image"].shape[0], flush=True)
"""


@pytest.mark.slow  # multi-process or subprocess: > ~10 s on 2 cores (make test-quick leaves it out)
def test_a_script_leaving_a_loader_alive_still_exits(tmp_path):
    """Workers ignore SIGTERM (for preemption), so multiprocessing's exit handler, which SIGTERMs and joins
    them, would wait forever; clip_pl's exit hook kills them first and the script ends."""
    import os
    import subprocess
    import sys

    script = tmp_path / "leaves_a_loader.py"
    script.write_text(_SCRIPT_LEAVING_A_LOADER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    try:
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "shards")],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the script did not exit: {e.stderr}") from None
    assert done.returncode == 0 and done.stdout.strip() == "2", done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_evaluation_loaders_ignore_stop_signals_in_workers(tmp_path):
    from clip_pl.eval.datasets import loader

    marker = tmp_path / "handled.txt"
    old = {s: signal.signal(s, _marker_handler(marker)) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        pids = list(loader(_SignalSelf(), batch_size=1, num_workers=1, collate_fn=_first))
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    assert len(pids) == 1 and not marker.exists()
