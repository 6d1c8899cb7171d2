"""Preemption as on a real job, on the loopback cluster: 2 nodes × 2 tasks (4 ranks), 2 loader workers
per rank, shards written by data_prep from a local web server, no per-step sleep; three preemptions
in one run, then every sample of every epoch trained exactly once and the same final weights as
the same run without preemption. The shards are given as the README types a brace pattern, through
bash: ``data.train_shards='…/{00000..00003}.tar'``.

    pytest tests/slurm/test_preemption_realistic.py          # ~4 min on 2 cores

The three preemptions, each at a random offset (the seed is printed; CLIP_PL_TEST_SEED=<n> repeats it):

1. SIGUSR1 (what ``--signal=SIGUSR1@120`` sends before the time limit) while the 1st or 2nd periodic
   checkpoint is being written (tests/slurm/slow_save.py holds that save open for 3 s): the save
   finishes, and the ranks act at the next step boundary;
2. SIGUSR1 as soon as the second life starts training, while the workers load their first batches
   (SLURM signals every process of the step: the workers must ignore it);
3. SIGTERM (what preemption by a higher-priority job sends): the ranks save and stop, and the test
   then requeues the job with ``scontrol requeue``, as SLURM's PreemptMode=REQUEUE would.

It is also the end-to-end test of slurm/train_256gpu.sh's requeue: one job id and one log for the four
lives, each one process group of all ranks that knows its restart count, the optimizer's learning rate
restored, and one metrics.csv with every optimizer step once.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from clip_pl.plots import read_series
from tests.slurm.jobs import REPO, log_tail, sbatch, wait_finished, wait_until

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.timeout(1200),
]  # ~220 s alone, ~400 s beside the rest of the suite

NODES, TASKS_PER_NODE, WORKERS = 2, 2, 2
WORLD = NODES * TASKS_PER_NODE
LOCAL_BATCH = 8
SAMPLES, SHARD_SIZE = 200, 60  # shards of 60, 60, 60, 20 samples
STEPS_PER_EPOCH = SAMPLES // (WORLD * LOCAL_BATCH)  # 6; 8 samples left out per epoch
MAX_STEPS = 3 * STEPS_PER_EPOCH  # three epochs
CKPT_EVERY = 2


def _make_shards(out: Path) -> Path:
    """Digits images served by data_prep's local web server, downloaded into shards by data_prep
    (the real img2dataset); this runs in a subprocess because img2dataset spawns its workers."""
    code = f"""
import pandas as pd
from pathlib import Path
from data_prep.demo import digits
from data_prep.demo.server import FaultyImageServer, Route
from data_prep.download import download
if __name__ == "__main__":
    out = Path({str(out)!r})
    images, labels = digits.load_digits_arrays()
    routes = {{f"/d/{{i}}.png": Route(digits.png_bytes(digits.upscale(images[i], 64)), "image/png")
               for i in range({SAMPLES})}}
    with FaultyImageServer(routes) as web:
        rows = [(web.url_for(f"/d/{{i}}.png"), f"a photo of the digit {{labels[i]}}") for i in range({SAMPLES})]
        out.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows, columns=["url", "caption"]).to_parquet(out / "urls.parquet")
        stats = download(out / "urls.parquet", out / "shards", shard_size={SHARD_SIZE}, processes=1, threads=16,
                         timeout=5, retries=0, image_size=64, resize_mode="border", encode_format="jpg")
    assert stats["samples_in_shards"] == {SAMPLES}, stats
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=180, capture_output=True)
    return out / "shards"


def _overrides(root: Path, shards: Path, slow_save_at: int = 1) -> list[str]:
    return [
        "+callbacks.slow_save._target_=tests.slurm.slow_save.SlowSave",  # see tests/slurm/slow_save.py
        "+callbacks.slow_save.marker=${paths.run_dir}/saving",
        f"+callbacks.slow_save.at_save={slow_save_at}",
        "model=tiny",
        "data=wds",  # data.train_shards: _typed_shards
        f"data.batch_size={LOCAL_BATCH}",
        f"data.num_workers={WORKERS}",
        "data.record_keys=true",
        "data.shuffle_buffer=50",
        "trainer=cpu",
        "strategy=ddp",
        "strategy.process_group_backend=gloo",
        # DDP sums the first step of every life in one bucket and later steps in buckets rebuilt in
        # autograd order; at 4 ranks the ring all-reduce then adds each gradient in another order
        # after a restart (~1e-8, amplified by Adam to ~1e-6). Without the rebuild (it is skipped
        # when DDP looks for unused parameters) every step of every life sums in one fixed order.
        "strategy.find_unused_parameters=true",
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        f"paths.root_dir={root}",
        f"callbacks.checkpoint.every_n_train_steps={CKPT_EVERY}",
        "scheduler.warmup_steps=5",
    ]


def _typed_shards(shards: Path) -> str:
    """The shards as the README types a brace pattern: in single quotes, which bash takes off; sbatch,
    launch.sh and srun pass the braces on, and clip_pl.train quotes them for Hydra (clip_pl/cli_args.py)."""
    return f"data.train_shards='{shards}/{{00000..00003}}.tar'"


def _submit(cluster, root: Path, shards: Path, log: Path, name: str, slow_save_at: int = 1) -> str:
    return sbatch(
        cluster,
        REPO / "slurm" / "train_256gpu.sh",
        [
            f"--nodes={NODES}",
            f"--ntasks-per-node={TASKS_PER_NODE}",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            "--time=10",
            f"--job-name={name}",
            f"--output={log}",
        ],
        _overrides(root, shards, slow_save_at),
        # this checkout's code in the job, whatever the venv's editable install points at
        env={
            "CLIP_PL_PYTHON": sys.executable,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        },
        typed=_typed_shards(shards),  # through bash -c
    )


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _max_step(run_dir: Path) -> int:
    """The slowest rank's last recorded step (0 before every rank recorded one)."""
    steps = []
    for path in (run_dir / "keys").glob("rank*.jsonl"):
        lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
        if lines:
            steps.append(json.loads(lines[-1])["step"])
    return min(steps) if len(steps) == WORLD else 0


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def _assert_one_metrics_log(run_dir: Path, preempted_at: list[int]) -> None:
    """Every optimizer step once, in order, across the lives. Whether the row of the step taken at global step
    k says k or k + 1 is the trainer's choice, read off the first row. A row may be missing only for a step in
    flight when a preemption landed: if the signal came after its optimizer step but before Lightning wrote its
    metrics, the checkpoint counts the step and the life ends before the row is written."""
    series = read_series(run_dir / "csv" / "metrics.csv")
    steps = [step for step, _ in series["train/loss"]]
    offset = steps[0] if steps else 0
    expected = list(range(offset, offset + MAX_STEPS))
    in_flight = {step - 1 + offset for step in preempted_at}
    assert offset in (0, 1) and steps == sorted(set(steps)) and set(expected) - set(steps) <= in_flight, (
        f"metrics.csv is not one log of {MAX_STEPS} consecutive steps: rows for {steps}. Rows of an earlier life "
        "missing: Lightning's CSVLogger deleted the existing metrics.csv. A repeated or shifted step: a restart "
        "did not continue the previous life's numbering."
    )
    assert set(steps) <= set(expected)
    assert {value for _, value in series["train/world_size"]} == {WORLD}
    assert {value for _, value in series["train/global_batch_size"]} == {WORLD * LOCAL_BATCH}


def test_three_preemptions_train_every_sample_once_and_match_the_uninterrupted_run(slurm_cluster, tmp_path):
    t0 = time.monotonic()
    seed = int(os.environ.get("CLIP_PL_TEST_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    print(f"CLIP_PL_TEST_SEED={seed}")
    shards = _make_shards(tmp_path / "corpus")
    assert json.loads((shards / "sizes.json").read_text()) == {
        "00000.tar": 60,
        "00001.tar": 60,
        "00002.tar": 60,
        "00003.tar": 20,
    }
    log = tmp_path / "preempted.out"
    job = _submit(slurm_cluster, tmp_path, shards, log, "clip-preempt-test", slow_save_at=rng.randint(1, 2))
    run_dir = tmp_path / "runs" / job
    signals: list[dict] = []

    def diagnose() -> str:
        return (
            f"seed {seed}; signals {signals}\nscontrol: {slurm_cluster.job_fields(job)}\n"
            f"events: {_events(run_dir)}\njob log:\n{log_tail(log, 6000)}"
        )

    def running_and(predicate):
        last_asked = [0.0]

        def check():
            # The files are read at every poll (down to 50 ms); SLURM is asked once a second (each `scontrol`
            # is a process and an RPC to slurmctld, CPU the job's ranks need), enough to notice a job that died.
            if time.monotonic() - last_asked[0] >= 1.0:
                last_asked[0] = time.monotonic()
                state = slurm_cluster.job_fields(job).get("JobState")
                assert state in ("PENDING", "RUNNING", "CONFIGURING"), (
                    f"job {state} before it was preempted\n{diagnose()}"
                )
            return predicate()

        return check

    def requeued(restarts: int) -> None:
        def settled():
            fields = slurm_cluster.job_fields(job)
            ok = int(fields.get("Restarts", 0)) >= restarts and fields.get("JobState") in ("PENDING", "RUNNING")
            return fields if ok else None

        # generous: on a loaded 2-core box a life can take a minute to reach its next step boundary
        fields = wait_until(f"requeue #{restarts}", settled, timeout=180, diagnose=diagnose)
        if fields["JobState"] == "PENDING":  # SLURM holds a requeued job ~120 s (BeginTime): start it now,
            # but not within the second of the requeue: slurmd refuses a credential no newer than the
            # revoked one ("Job credential revoked"), and the job would fail instead of starting.
            time.sleep(2)
            slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")

    def hpc_checkpoints() -> list[Path]:
        return sorted(run_dir.glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.split("_")[-1]))

    try:
        # 1. SIGUSR1 while a periodic checkpoint is being written (the at_save-th, made slow).
        wait_until(
            "a checkpoint being written",
            running_and((run_dir / "saving").exists),
            timeout=150,
            diagnose=diagnose,
            poll=0.05,
        )
        slurm_cluster.run("scancel", "--signal=USR1", job)
        signals.append({"signal": "USR1", "during_save": (run_dir / "saving").exists(), "step": _max_step(run_dir)})
        requeued(1)

        # 2. SIGUSR1 as soon as the second life starts training: its workers are loading batches.
        wait_until(
            "the second life's start",
            running_and(lambda: len([e for e in _events(run_dir) if e["event"] == "start"]) >= 2),
            timeout=150,
            diagnose=diagnose,
            poll=0.1,
        )
        slurm_cluster.run("scancel", "--signal=USR1", job)
        signals.append({"signal": "USR1", "at_start": True, "step": _max_step(run_dir)})
        requeued(2)

        # 3. SIGTERM, as a preempting job's would: save and stop; then requeue as SLURM's preemption would.
        wait_until(
            "the third life's start",
            running_and(lambda: len([e for e in _events(run_dir) if e["event"] == "start"]) >= 3),
            timeout=150,
            diagnose=diagnose,
            poll=0.2,
        )
        resumed = _events(run_dir)[-1]["global_step"]
        # Any of the next four steps, an epoch's last one included (CLIP_PL_TEST_SEED=5260 draws step 6: the
        # life after it once hung, a loader worker forked from a rank stuck in os.fork; workers now
        # start from a forkserver, clip_pl/data/workers.py).
        third_stop = rng.choice(range(resumed + 1, resumed + 5))
        wait_until(
            f"step {third_stop}",
            running_and(lambda: _max_step(run_dir) >= third_stop),
            timeout=120,
            diagnose=diagnose,
            poll=0.2,
        )
        before = len(hpc_checkpoints())
        slurm_cluster.run("scancel", "--signal=TERM", job)
        signals.append({"signal": "TERM", "step": _max_step(run_dir)})
        wait_until("the SIGTERM checkpoint", lambda: len(hpc_checkpoints()) > before, timeout=60, diagnose=diagnose)
        wait_until(
            "the third life's end",
            lambda: sum(e["event"] == "end" for e in _events(run_dir)) >= 3,
            timeout=60,
            diagnose=diagnose,
        )
        slurm_cluster.run("scontrol", "requeue", job)
        requeued(3)
        fields = wait_finished(slurm_cluster, job, timeout=240, log=log)
    finally:
        slurm_cluster.run("scancel", job, check=False)
    preempted_wall = time.monotonic() - t0
    print(f"preempted run: {preempted_wall:.0f} s; signals {signals}")
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", diagnose()
    assert fields["Restarts"] == "3", diagnose()

    # The brace pattern reached the config as typed (the shell's quotes off, nothing else changed).
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").data.train_shards == f"{shards}/{{00000..00003}}.tar"

    # Every life started where the previous one saved; each preemption saved at one step on all ranks.
    events = _events(run_dir)
    starts = [e for e in events if e["event"] == "start"]
    ends = [e for e in events if e["event"] == "end"]
    assert len(starts) == 4 and len(ends) == 4, events
    assert all(s["world_size"] == WORLD and s["global_batch_size"] == WORLD * LOCAL_BATCH for s in starts)
    assert [(s["slurm_job_id"], s["restart_count"]) for s in starts] == [(job, n) for n in range(4)]
    assert starts[0]["global_step"] == 0 and starts[0]["resumed_from"] is None
    hpc = hpc_checkpoints()
    assert [int(p.stem.split("_")[-1]) for p in hpc] == [e["preempted_at_step"] for e in ends[:3]], (hpc, ends)
    for start, end, path in zip(starts[1:], ends[:3], hpc):
        saved = torch.load(path, map_location="cpu", weights_only=False)
        assert saved["global_step"] == end["preempted_at_step"]
        # the restored optimizer (warmup, then cosine: no two steps share a learning rate)
        assert math.isclose(start["lr"], saved["optimizer_states"][0]["param_groups"][0]["lr"], rel_tol=1e-6)
        # resumed at that step: from the hpc checkpoint, or from last.ckpt when ModelCheckpoint's periodic
        # save fell on the same step (written just after it, so newer; the same state)
        assert start["global_step"] == end["global_step"] == end["preempted_at_step"]
        assert Path(start["resumed_from"]).name in (path.name, "last.ckpt"), (start, path)
    assert ends[-1]["global_step"] == MAX_STEPS and ends[-1]["preempted_at_step"] is None
    text = log.read_text()
    assert text.count("Requeuing: scontrol requeue") == 2, diagnose()  # SIGUSR1 twice; SIGTERM does not requeue
    assert "exited unexpectedly" not in text and "Traceback" not in text, diagnose()
    # One log for the four lives (--open-mode=append), each one process group of every rank on both nodes.
    assert all(f"job {job} restart {n}:" in text for n in range(4)), diagnose()
    assert text.count(f"Starting with {WORLD} processes") == 4 and fields["NodeList"] == "n[1-2]", diagnose()
    _assert_one_metrics_log(run_dir, [e["preempted_at_step"] for e in ends[:3]])

    # Exactly once: the audit a user runs after a preempted job.
    audit = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_pl.data.audit",
            str(run_dir),
            "--sizes",
            str(shards),
            "--json",
            str(tmp_path / "audit.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    print(audit.stdout)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    report = json.loads((tmp_path / "audit.json").read_text())
    assert [(e["complete"], e["duplicates"], e["missing"]) for e in report["epochs"]] == [(True, 0, 8)] * 3

    # The same run without preemption: the same samples at the same steps, and the same weights.
    t1 = time.monotonic()
    ref_log = tmp_path / "reference.out"
    ref_job = _submit(slurm_cluster, tmp_path, shards, ref_log, "clip-preempt-ref")
    try:
        ref_fields = wait_finished(slurm_cluster, ref_job, timeout=240, log=ref_log)
    finally:
        slurm_cluster.run("scancel", ref_job, check=False)
    print(f"reference run: {time.monotonic() - t1:.0f} s; whole test {time.monotonic() - t0:.0f} s")
    assert ref_fields["JobState"] == "COMPLETED", log_tail(ref_log)
    ref_dir = tmp_path / "runs" / ref_job
    for rank in range(WORLD):
        ours = [json.loads(line) for line in (run_dir / "keys" / f"rank{rank}.jsonl").read_text().splitlines()]
        theirs = [json.loads(line) for line in (ref_dir / "keys" / f"rank{rank}.jsonl").read_text().splitlines()]
        assert [(r["step"], r["keys"]) for r in ours] == [(r["step"], r["keys"]) for r in theirs], rank
    a, b = _weights(run_dir / "checkpoints" / "last.ckpt"), _weights(ref_dir / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"final weights: max difference {diff:.3g} from the uninterrupted run")
    assert diff <= 1e-6, f"final weights differ from the uninterrupted run by {diff}"
