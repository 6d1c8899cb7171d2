"""One rank writes the run directory's shared files: ranks > 0 (srun's SLURM_PROCID, torchrun's RANK)
write no .hydra/*.yaml and no train.log, so 256 ranks do not all rewrite the same files.

    pytest tests/test_train_rank_files.py      # ~40 s (two one-batch runs)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, env: dict[str, str]) -> Path:
    run = tmp_path / "runs" / "r"
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID")}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_pl.train",
            "debug=smoke",
            "trainer.fast_dev_run=true",
            "data.batch_size=4",
            f"paths.root_dir={tmp_path}",
            "run_name=r",
        ],
        cwd=REPO,
        env={**base, **env, "PYTHONPATH": str(REPO)},
        check=True,
        capture_output=True,
        timeout=300,
    )
    return run


@pytest.mark.parametrize("var", ["SLURM_PROCID", pytest.param("RANK", marks=pytest.mark.slow)])  # ~10 s each
def test_ranks_above_zero_write_no_shared_files(tmp_path, var):
    run = _run(tmp_path, {var: "1"})
    assert not (run / ".hydra").exists() and not (run / "train.log").exists(), sorted(os.listdir(run))


def test_rank_zero_writes_them(tmp_path):
    run = _run(tmp_path, {"SLURM_PROCID": "0"})
    assert (run / ".hydra" / "config.yaml").exists() and (run / "train.log").exists()
