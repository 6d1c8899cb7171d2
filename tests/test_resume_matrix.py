"""Resume matrix through the real entry point (``clip_pl.train.train``, ``resume=auto``).

A run on tiny WebDataset shards crashes right after the checkpoint of step k and is started
again with the same config; it must go on exactly like a run that was never interrupted: the same
sample keys at every step on every rank (no repeat, no skip) and the same loss curve in its
``metrics.csv``. Worker counts 1-3, every leftover count ``batches_per_rank mod num_workers``
(0 .. workers-1), stops in the first epoch, one batch before its end, at its last batch and in
the second epoch; 1 process, and 2 gloo ranks (DDP, processes started outside Lightning as srun
or torchrun do).

    python -m pytest tests/test_resume_matrix.py -q
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.support.config import SMALLER
from tests.support.distributed import run_distributed
from tests.support.fake_shards import write_shards

# Compares two computations of the same numbers: also run under ATEN_CPU_CAPABILITY=avx2 in CI (.ci/run).
pytestmark = pytest.mark.numerics

BATCH = 2


class KeyLog(L.Callback):
    """Appends the sample keys of every trained batch to ``keys_rank<r>.jsonl`` (one line per step)."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / f"keys_rank{trainer.global_rank}.jsonl", "a") as handle:
            handle.write(json.dumps({"step": trainer.global_step, "keys": list(batch["key"])}) + "\n")


class Crash(RuntimeError):
    pass


class CrashAfter(L.Callback):
    """Dies when step ``step + 1`` is about to start, i.e. right after step ``step``'s checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"simulated preemption after step {self.step}")


def shard_sizes(world: int, batches: int) -> list[int]:
    """Uneven shards holding ``batches`` global batches plus one sample that no batch can use."""
    total = world * BATCH * batches + 1
    first = total // 3 + 1
    return [first, 1, total - first - 1]


def overrides(run_dir: Path, shards: Path, workers: int, world: int, max_steps: int) -> list[str]:
    return [
        "model=tiny",
        *SMALLER,
        "trainer=cpu",
        "data=wds",
        f"data.train_shards={shards}",
        f"data.batch_size={BATCH}",
        f"data.num_workers={workers}",
        "+data.return_keys=true",
        "data.shuffle_buffer=4",
        "data.prefetch_factor=1",
        "global_batch_size=null",
        "logger=csv",
        f"trainer.devices={world}",
        f"trainer.max_steps={max_steps}",
        "trainer.log_every_n_steps=1",
        "scheduler.warmup_steps=2",
        f"paths.run_dir={run_dir}",
        "resume=auto",
        "callbacks.progress_bar=null",
        f"+callbacks.keylog._target_={__name__}.KeyLog",
        f"+callbacks.keylog.directory={run_dir}",
    ]


def run(run_dir: Path, shards: Path, workers: int, world: int, max_steps: int, stop: int | None = None) -> None:
    """One start of the entry point; with ``stop``, checkpoints at that step and crashes after it."""
    from clip_pl.train import train
    from tests.support.config import make_cfg

    extra = []
    if stop is not None:
        extra = [
            f"callbacks.checkpoint.every_n_train_steps={stop}",
            f"+callbacks.crash._target_={__name__}.CrashAfter",
            f"+callbacks.crash.step={stop}",
        ]
    cfg = make_cfg([*overrides(run_dir, shards, workers, world, max_steps), *extra], run_dir.parent)
    train(cfg)


def keys_by_step(run_dir: Path, rank: int) -> list[tuple[int, list[str]]]:
    lines = (run_dir / f"keys_rank{rank}.jsonl").read_text().splitlines()
    return [(r["step"], r["keys"]) for r in map(json.loads, lines)]


def loss_curve(run_dir: Path) -> list[tuple[int, float, float]]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("train/loss")]
    return [(int(float(r["step"])), float(r["train/loss"]), float(r["train/lr"])) for r in rows]


def interrupted_and_resumed(root: Path, shards: Path, workers: int, world: int, batches: int, stops: list[int]) -> dict:
    """The uninterrupted reference, and one run directory that crashes after each stop in turn and
    is restarted each time (a job preempted several times); keys, curves and loader states."""
    steps = 2 * batches  # two epochs
    reference, resumed = root / "reference", root / "resumed"
    run(reference, shards, workers, world, steps)
    states = {}
    for stop in stops:
        with pytest.raises(Crash):
            run(resumed, shards, workers, world, steps, stop=stop)  # resume=auto from the previous stop, if any
        saved = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
        assert saved["global_step"] == stop
        states[stop] = {k: saved["WebDatasetDataModule"][k] for k in ("epoch", "batches_consumed")}
    run(resumed, shards, workers, world, steps)  # the same command once more: resume=auto, to the end
    return {"reference": _outcome(reference, world), "resumed": _outcome(resumed, world), "states": states}


def _outcome(run_dir: Path, world: int) -> dict:
    return {"keys": [keys_by_step(run_dir, r) for r in range(world)], "loss": loss_curve(run_dir)}


def check(outcome: dict, world: int, batches: int) -> None:
    reference, resumed = outcome["reference"], outcome["resumed"]
    steps = 2 * batches
    for rank_keys in reference["keys"]:
        assert [step for step, _ in rank_keys] == list(range(1, steps + 1))
    for epoch in range(2):  # the reference itself: every usable sample once per epoch, over all ranks
        keys = [
            k
            for rank_keys in reference["keys"]
            for step, batch in rank_keys
            if epoch * batches < step <= (epoch + 1) * batches
            for k in batch
        ]
        assert len(keys) == len(set(keys)) == world * BATCH * batches
    for stop, state in outcome["states"].items():
        # The checkpoint of an epoch's last step still belongs to that epoch (all its batches consumed).
        epoch, consumed = divmod(stop - 1, batches)
        assert state == {"epoch": epoch, "batches_consumed": consumed + 1}, f"loader state saved at step {stop}"
    for rank in range(world):
        for (step, keys), (ref_step, ref_keys) in zip(resumed["keys"][rank], reference["keys"][rank]):
            assert (step, keys) == (ref_step, ref_keys), (
                f"rank {rank}, step {step} (stops {list(outcome['states'])}): the resumed run trained other "
                "samples than the uninterrupted one"
            )
        assert len(resumed["keys"][rank]) == len(reference["keys"][rank]) == steps, "no step repeated or lost"
    curve = [value for row in resumed["loss"] for value in row]
    assert [row[0] for row in resumed["loss"]] == list(range(1, steps + 1)), "metrics.csv: one row per step"
    assert curve == pytest.approx([value for row in reference["loss"] for value in row], rel=1e-5, abs=1e-8)


# (num_workers, batches per rank and epoch): every leftover count 0 .. workers-1 (3 workers with 2 left
# over: on 2 ranks, TWO_RANKS below).
SINGLE = [(1, 3), (2, 4), (2, 5), (3, 6), (3, 4)]
QUICK = (2, 5)  # the one case make test-quick runs (~10 s each); make test runs them all


def stops_for(batches: int) -> list[int]:
    # mid-epoch, one batch before the epoch's end, its last batch, and inside the second epoch
    return sorted({1, batches - 1, batches, batches + 2})


@pytest.mark.parametrize(
    "workers,batches",
    [pytest.param(w, b, marks=() if (w, b) == QUICK else pytest.mark.slow) for w, b in SINGLE],
    ids=[f"w{w}-b{b}-left{b % w}" for w, b in SINGLE],
)
def test_resume_matrix_one_process(tmp_path, workers, batches):
    shards = tmp_path / "shards"
    write_shards(str(shards), shard_sizes(1, batches), image_px=(64, 72))
    check(interrupted_and_resumed(tmp_path / "runs", shards, workers, 1, batches, stops_for(batches)), 1, batches)


def _two_ranks(rank: int, world: int, root: str, shards: str, workers: int, batches: int, stops: list[int]) -> dict:
    import multiprocessing

    # run_distributed's ranks are daemon processes, which may not have children; a launched rank is not one.
    multiprocessing.current_process()._config["daemon"] = False  # type: ignore[attr-defined]
    return interrupted_and_resumed(Path(root), Path(shards), workers, world, batches, stops)


TWO_RANKS = [(2, 3), (3, 5)]


@pytest.mark.slow
@pytest.mark.parametrize("workers,batches", TWO_RANKS, ids=[f"w{w}-b{b}-left{b % w}" for w, b in TWO_RANKS])
def test_resume_matrix_two_gloo_ranks(tmp_path, workers, batches):
    shards = tmp_path / "shards"
    write_shards(str(shards), shard_sizes(2, batches), image_px=(64, 72))
    stops = stops_for(batches)
    results = run_distributed(_two_ranks, 2, args=(str(tmp_path / "runs"), str(shards), workers, batches, stops))
    check(results[0], 2, batches)
