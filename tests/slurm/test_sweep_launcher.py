"""clip_pl/conf/hydra/launcher/submitit_slurm.yaml runs a real two-point sweep on the loopback cluster.

pytest tests/slurm/test_sweep_launcher.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm.jobs import REPO

pytestmark = pytest.mark.slurm

APP = Path(__file__).parent / "sweep_app" / "sweep_app.py"


def test_sweep_submits_one_requeueable_job_per_point_with_lightning_owning_the_signal(slurm_cluster, tmp_path):
    cmd = [
        sys.executable,
        str(APP),
        "-m",
        "hydra/launcher=submitit_slurm",
        "x=1,2",
        f"out_dir={tmp_path}",
        f"hydra.sweep.dir={tmp_path}/sweep",
        # shrink the project's 8-GPU default to what the loopback nodes have
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.tasks_per_node=1",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=5",
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env={**slurm_cluster.env, "CLIP_PL_REPO": str(REPO)}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    records = [json.loads((tmp_path / f"x{x}.json").read_text()) for x in (1, 2)]
    assert len({r["slurm_job_id"] for r in records}) == 2  # one SLURM job per sweep point
    for rec in records:
        assert rec["ntasks_per_node"] == "1"
        assert rec["srun_cpus_per_task"] == "1"  # the setup line restored srun's --cpus-per-task
        assert rec["usr1_default"]  # nobody took SIGUSR1: Lightning's handler can register

    scripts = list((tmp_path / "sweep" / ".submitit").glob("*/*_submission.sh"))
    assert scripts, "submitit wrote no submission script"
    text = scripts[0].read_text()
    assert "#SBATCH --signal=USR1@120" in text and "USR2" not in text  # one owner of requeue
    assert "#SBATCH --requeue" in text
