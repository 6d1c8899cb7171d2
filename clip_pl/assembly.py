"""Turn a checked Hydra config into the objects of a run: data, module, trainer, resume point.

Kept apart from ``train.py`` so tests and benchmarks build exactly what the entry point builds.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf

from clip_pl.callbacks.loop import StepSleep
from clip_pl.checkpointing import AtomicCheckpointIO, find_resume_checkpoint
from clip_pl.config_checks import check_resume, instantiates, uses_deepspeed, world_size_of
from clip_pl.module import CLIPModule
from clip_pl.towers import split_tower_lr


def build_module(cfg: DictConfig) -> CLIPModule:
    """conf/model names its builder (``CLIPModule.from_options``, partial); loss and optimizer complete it."""
    optim, tower_lr = split_tower_lr(
        OmegaConf.to_container(cfg.optim, resolve=True)
    )  # conf/optim's tower LR keys are the module's, not the optimizer's
    return instantiate(cfg.model)(
        loss=instantiate(cfg.loss),
        optimizer=instantiate(optim),
        tower_lr=tower_lr,
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    )


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    nodes = list((cfg.get("callbacks") or {}).values())
    nodes += list(((cfg.get("eval") or {}).get("callbacks") or {}).values())
    callbacks = [instantiate(node) for node in nodes if node is not None]
    sleep = (cfg.get("debug") or {}).get("step_sleep_s")
    if sleep:
        callbacks.append(StepSleep(sleep))
    return callbacks


def wandb_run_id(run_dir: str | os.PathLike) -> str:
    """Stable across requeues of one job (same run directory), distinct across run directories."""
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]
    return f"{Path(run_dir).name}-{digest}"


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if node is None:
            continue
        if instantiates(node, WandbLogger):
            logger = instantiate(node, id=node.id or wandb_run_id(run_dir))
            if OmegaConf.select(cfg, "logger.wandb") is not None:
                # The fully resolved config, so every run in W&B says exactly what it ran.
                logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        else:
            logger = instantiate(node)
        loggers.append(logger)
    return loggers


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    # DDP over a single process only adds a gradient all-reduce with itself: run it plainly.
    single_process = world_size_of(cfg) == 1 and instantiates(cfg.strategy, DDPStrategy) and not uses_deepspeed(cfg)
    strategy = "auto" if single_process else instantiate(cfg.strategy)
    plugins = []
    if not uses_deepspeed(cfg):  # DeepSpeed writes its own sharded folders
        plugins.append(AtomicCheckpointIO())
    if SLURMEnvironment.detect():
        # Lightning's auto-requeue saves inside the signal handler (Lightning #21406); requeue is
        # clip_pl.callbacks.preemption.PreemptionCheckpoint's job (callbacks.preemption).
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return instantiate(
        cfg.trainer,
        strategy=strategy,
        callbacks=build_callbacks(cfg),
        logger=build_loggers(cfg, run_dir) or False,
        plugins=plugins,
        default_root_dir=str(run_dir),
    )


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint to resume from, or None; ``clip_pl.config_checks.check_resume`` refuses what cannot be."""
    check_resume(cfg, run_dir)
    if cfg.resume in (None, "none"):
        return None
    if cfg.resume == "auto":
        return find_resume_checkpoint(run_dir)
    return str(cfg.resume)
