"""A one-line Hydra task that the sweep test runs through clip_pl/conf/hydra/launcher/submitit_slurm.yaml.

    python tests/slurm/sweep_app/sweep_app.py -m hydra/launcher=submitit_slurm x=1,2 [launcher overrides]

It records what each SLURM job saw (its sweep value, job id, the signal handler SLURM will
trigger), so the test checks the project's launcher config without depending on the trainer.
"""

import json
import os
import signal
from pathlib import Path

import hydra


@hydra.main(config_path=".", config_name="sweep_app", version_base="1.3")
def main(cfg) -> None:
    record = {"x": cfg.x, "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
              "ntasks_per_node": os.environ.get("SLURM_NTASKS_PER_NODE"),
              "srun_cpus_per_task": os.environ.get("SRUN_CPUS_PER_TASK"),
              "usr1_default": signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL}
    Path(cfg.out_dir, f"x{cfg.x}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
