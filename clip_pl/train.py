"""Train a CLIP model: compose the Hydra config, check it, build, fit.

    python -m clip_pl.train debug=smoke          # tiny model, random data, CPU, 20 steps
    python -m clip_pl.train experiment=demo
    python -m clip_pl.train experiment=laion400m_vit_b32 data.train_shards='/data/{00000..41455}.tar'
    clip-pl-train --cfg job                      # print the composed config and exit
    sbatch slurm/train_256gpu.sh experiment=laion400m_vit_b32

A restarted run (SLURM requeue, or the same command with the same run_name) resumes from the
newest checkpoint in its run directory: weights, optimizer, scheduler, step, loader position.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from clip_pl.assembly import build_module, build_trainer, resume_checkpoint
from clip_pl.cli_args import quote_brace_patterns
from clip_pl.config_checks import prepare_config
from clip_pl.config_dir import config_dir

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> L.Trainer:
    prepare_config(cfg)  # refuses a bad config before anything is allocated
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.run_dir)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    trainer = build_trainer(cfg, run_dir)
    ckpt_path = resume_checkpoint(cfg, run_dir)
    if ckpt_path:
        log.info("Resuming from %s", ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    # Lightning's local DDP launcher restarts this script for ranks 1.. with the parent's
    # hydra.run.dir but not its run_name (a timestamp by default): pin the run directory to
    # Hydra's, so every rank writes to and resumes from the same one.
    with open_dict(cfg):
        cfg.paths.run_dir = HydraConfig.get().runtime.output_dir
    train(cfg)


def launched_rank() -> int:
    """This process's global rank as its launcher set it (srun: SLURM_PROCID; torchrun: RANK), before
    any process group exists; 0 when launched alone."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


# Ranks > 0 leave the shared files of the run directory to rank 0: no .hydra/*.yaml, no train.log
# (256 ranks writing the same files on a shared file system); their log lines go to the console,
# i.e. the job's log.
RANK_NONZERO_OVERRIDES = [
    "hydra.output_subdir=null",
    "~hydra.job_logging.handlers.file",
    "hydra.job_logging.root.handlers=[console]",
]


def main() -> None:
    # data.train_shards=/data/{00000..00331}.tar as the shell leaves it: quoted for Hydra (clip_pl/cli_args.py)
    sys.argv[1:] = quote_brace_patterns(sys.argv[1:])
    if launched_rank() > 0:
        sys.argv += [o for o in RANK_NONZERO_OVERRIDES if o not in sys.argv]
    _hydra_main()


if __name__ == "__main__":
    main()
