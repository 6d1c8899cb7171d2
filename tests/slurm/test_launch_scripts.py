"""The sbatch scripts on the real loopback cluster, with a stand-in for the trainer.

    pytest tests/slurm/test_launch_scripts.py

What the launch does (topology → Hydra, rendezvous, one task per node, the user's overrides
untouched, clear failures) is checked here in seconds; tests/slurm/test_preemption_realistic.py trains for real.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.slurm.jobs import REPO, log_tail, sbatch, wait_finished

pytestmark = pytest.mark.slurm

FAKE_PYTHON = Path(__file__).with_name("fake_python.sh")
SMALL = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=5"]


def sbatch_directives(script: Path) -> dict[str, str]:
    """#SBATCH lines as {option: value} ('' for flags)."""
    found = {}
    for line in script.read_text().splitlines():
        match = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if match:
            found[match.group(1)] = match.group(2) or ""
    return found


@pytest.mark.parametrize("script, nodes", [("train_256gpu.sh", "32"), ("train_1node.sh", "1")])
def test_scripts_request_gpu_topology_and_lightning_requeue(script, nodes):
    d = sbatch_directives(REPO / "slurm" / script)
    assert d["nodes"] == nodes
    assert d["ntasks-per-node"] == d["gpus-per-node"] == "8"  # one task per GPU: Lightning's devices
    assert int(d["cpus-per-task"]) >= 1
    # SIGUSR1 to the tasks (no "B:" prefix: the trainer, not the batch shell, must get it)
    assert d["signal"] == "SIGUSR1@120"
    assert "requeue" in d and d["open-mode"] == "append"


def _records(out_dir: Path) -> list[dict[str, list[str] | str]]:
    records = []
    for path in sorted(out_dir.glob("task-*.txt")):
        rec: dict = {"arg": []}
        for line in path.read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "arg":
                rec["arg"].append(value)
            else:
                rec[key] = value
        records.append(rec)
    return records


def _run_fake(cluster, tmp_path, script, sbatch_args, overrides, log: Path | None = None, typed: str = ""):
    """Run ``script`` with fake_python.sh as the interpreter; ``log=None`` keeps the script's --output;
    ``typed``: overrides as shell text (see tests/slurm/jobs.py's sbatch)."""
    out = tmp_path / "tasks"
    out.mkdir()
    env = {"CLIP_PL_PYTHON": str(FAKE_PYTHON), "REAL_PYTHON": sys.executable, "FAKE_OUT": str(out)}
    job = sbatch(
        cluster,
        REPO / "slurm" / script,
        [*sbatch_args, *([f"--output={log}"] if log else [])],
        overrides,
        env=env,
        typed=typed,
    )
    if log is None:
        log = REPO / "slurm" / "logs" / f"{cluster.job_fields(job)['JobName']}-{job}.out"
    fields = wait_finished(cluster, job, timeout=60, log=log)
    assert fields["JobState"] == "COMPLETED", log_tail(log)
    return job, fields, _records(out), log


def test_256gpu_script_shrinks_to_two_cpu_nodes_and_passes_topology_first(slurm_cluster, tmp_path):
    overrides = ["experiment=demo", "model=tiny", "run_name=with space", "trainer.max_steps=3"]
    job, fields, records, log = _run_fake(
        slurm_cluster,
        tmp_path,
        "train_256gpu.sh",
        ["--nodes=2", "--ntasks-per-node=1", *SMALL],
        overrides,
        log=tmp_path / "job.out",
        typed="data.train_shards='/data/cc3m/{00000..00331}.tar'",  # as the README types it, through bash
    )
    # command-line flags beat the script's #SBATCH lines, --gpus-per-node=0 included
    assert fields["NumNodes"] == "2" and fields["NodeList"] == "n[1-2]"
    assert fields["Requeue"] == "1" and fields["TresPerNode"] == "gres:gpu:0"
    assert sorted(r["node"] for r in records) == ["n1", "n2"]
    assert sorted(r["procid"] for r in records) == ["0", "1"]
    for rec in records:
        assert rec["master"] == "n1"  # first host of the node list
        assert rec["cwd"] == str(REPO)  # the job runs from the repository it was submitted from
        # the user's words as the shell left them, untouched: clip_pl.train quotes the pattern for Hydra itself
        assert rec["arg"] == [
            "-m",
            "clip_pl.train",
            "trainer.num_nodes=2",
            "trainer.devices=1",
            *overrides,
            "data.train_shards=/data/cc3m/{00000..00331}.tar",
        ]


def test_1node_script_gives_devices_from_tasks_per_node(slurm_cluster, tmp_path):
    job, fields, records, log = _run_fake(
        slurm_cluster, tmp_path, "train_1node.sh", ["--ntasks-per-node=2", *SMALL], ["experiment=demo"]
    )
    try:  # the script's own --output: slurm/logs/<job name>-<job id>.out under the repository
        assert log == REPO / "slurm" / "logs" / f"clip-1node-{job}.out" and log.is_file()
        assert f"job {job} restart 0" in log.read_text()
    finally:
        log.unlink(missing_ok=True)
    assert [r["procid"] for r in records] == ["0", "1"]
    assert {r["node"] for r in records} == {"n1"} or {r["node"] for r in records} == {"n2"}
    assert records[0]["arg"][2:] == ["trainer.num_nodes=1", "trainer.devices=2", "experiment=demo"]


def test_submitting_outside_the_repository_fails_with_the_fix(slurm_cluster, tmp_path):
    log = tmp_path / "job.out"
    job = sbatch(
        slurm_cluster,
        REPO / "slurm" / "train_1node.sh",
        ["--ntasks-per-node=1", *SMALL, f"--output={log}"],
        ["experiment=demo"],
        cwd=tmp_path,
    )
    fields = wait_finished(slurm_cluster, job, timeout=30, log=log)
    assert fields["JobState"] == "FAILED"
    assert "not the clip_pl repository root" in log.read_text()


def test_python_without_clip_pl_fails_before_srun(slurm_cluster, tmp_path):
    log = tmp_path / "job.out"
    job = sbatch(
        slurm_cluster,
        REPO / "slurm" / "train_1node.sh",
        ["--ntasks-per-node=1", *SMALL, f"--output={log}"],
        ["experiment=demo"],
        env={"CLIP_PL_PYTHON": "false"},
    )  # an "interpreter" that cannot import anything
    fields = wait_finished(slurm_cluster, job, timeout=30, log=log)
    assert fields["JobState"] == "FAILED"
    text = log.read_text()
    assert "cannot import clip_pl" in text and "CLIP_PL_PYTHON" in text
    assert "srun" not in text  # failed on the batch node, before any task started
