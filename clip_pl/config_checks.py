"""Refuse configs that cannot work, before anything is allocated, with the fix in the message.

A bad override must fail here, in the first second, not after the model is built, the shards
are listed and 256 GPUs have joined a process group. ``python -m clip_pl.train`` runs these checks
twice: from ``RefuseBeforeTheRunDirectory`` (a Hydra callback, before Hydra creates the run directory
and writes ``.hydra/`` into it), and again in ``clip_pl.train.train`` (for callers of ``train(cfg)``).
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import re
import sys
import traceback
import typing
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from clip_pl.checkpointing import find_resume_checkpoint
from clip_pl.config_dir import global_batch_problem
from clip_pl.data.shardspec import check_sources_exist
from clip_pl.model import resolve_model_config
from clip_pl.towers import LOCK_KEYS, TOWER_LR_KEYS, check_tower_options, split_tower_lr

log = logging.getLogger(__name__)
# Mixed precision keeps fp32 weights (the temperature among them); "-true" half precisions would
# store the weights themselves in 16 bits, where small updates and the temperature are lost.
PRECISIONS = {"bf16-mixed", "16-mixed", "32", "32-true"}


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which key to change and how."""


def prepare_config(cfg: DictConfig, check_paths: bool = True) -> DictConfig:
    """Derive what is derived (per-device batch from a global batch), then check everything.

    ``check_paths``: also look at the file system, cheaply (a few stats): the local shard folders and
    patterns the data config names exist, and the run directory suits ``resume``. False checks the
    config alone (for configs whose paths are placeholders, such as the documentation's commands)."""
    _check_devices(cfg)
    _derive_batch_size(cfg)
    checks = [
        _check_targets,
        _check_model_architecture,
        _check_topology,
        _check_precision_and_strategy,
        _check_batch,
        _check_loss,
        _check_schedule,
        _check_towers_and_ema,
    ]
    if check_paths:
        checks += [_check_data_paths, _check_resume]
    for check in checks:
        check(cfg)
    return cfg


def world_size_of(cfg: DictConfig) -> int | None:
    devices, num_nodes = cfg.trainer.get("devices"), cfg.trainer.get("num_nodes", 1)
    if isinstance(devices, int) and isinstance(num_nodes, int):
        return devices * num_nodes
    return None


def target_class(node: Any) -> type | None:
    """The class a config node instantiates: its ``_target_`` itself, or what a builder function's
    return annotation says it returns (``deepspeed_strategy -> DeepSpeedStrategy``); None if neither."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    target = get_method(node._target_)
    if inspect.isclass(target):
        return target
    try:
        returned = typing.get_type_hints(target).get("return")
    except Exception:  # annotations that do not resolve say nothing about the class
        return None
    return returned if inspect.isclass(returned) else None


def instantiates(node: Any, *classes: type) -> bool:
    """Whether ``node`` builds an instance of one of ``classes`` (decided on the class, not its name)."""
    cls = target_class(node)
    return cls is not None and issubclass(cls, classes)


def uses_deepspeed(cfg: DictConfig) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return instantiates(cfg.strategy, DeepSpeedStrategy)


def uses_fsdp(cfg: DictConfig) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return instantiates(cfg.strategy, FSDPStrategy, ModelParallelStrategy)


def _is_deepspeed_cpu_adam(node: Any) -> bool:
    cls = target_class(node)  # resolving a DeepSpeedCPUAdam _target_ imports deepspeed.ops.adam; AdamW does not
    adam = sys.modules.get("deepspeed.ops.adam")
    return cls is not None and adam is not None and issubclass(cls, adam.DeepSpeedCPUAdam)


def _check_devices(cfg: DictConfig) -> None:
    """Lightning's own refusal of these comes after the model is built (and devices=0 divided by zero here)."""
    devices, nodes = cfg.trainer.get("devices"), cfg.trainer.get("num_nodes", 1)
    if isinstance(devices, int) and not isinstance(devices, bool) and devices < 1 and devices != -1:
        raise ConfigError(
            f"trainer.devices={devices} must be a positive number of devices per node (1 on a CPU), "
            f"or -1 for every GPU of the node."
        )
    if devices == -1 and cfg.trainer.get("accelerator") == "cpu":
        raise ConfigError(
            "trainer.devices=-1 means every GPU of the node; with trainer.accelerator=cpu give the number of "
            "processes (trainer.devices=1 for one)."
        )
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        raise ConfigError(f"trainer.num_nodes={nodes!r} must be a positive number of nodes.")


def _derive_batch_size(cfg: DictConfig) -> None:
    global_batch = cfg.get("global_batch_size")
    if global_batch is None:
        return
    # Checked before data.batch_size is read: its ${per_device_batch:…} default divides by the world size.
    problem = global_batch_problem(global_batch, cfg.trainer.get("devices"), cfg.trainer.get("num_nodes", 1))
    if problem:
        raise ConfigError(problem)
    world_size = cfg.trainer.devices * cfg.trainer.get("num_nodes", 1)  # positive integers, as just checked
    derived = global_batch // world_size
    # The data configs' own default is the interpolation ${per_device_batch:…}, which follows the global
    # batch; a literal is a value someone wrote (command line, experiment file): never overwrite it silently.
    explicit = not OmegaConf.is_interpolation(cfg.data, "batch_size")
    batch_size = cfg.data.batch_size
    if explicit and batch_size is not None and batch_size != derived:  # null: "none of my own", derive it
        other = f"global_batch_size={batch_size * world_size}, " if isinstance(batch_size, int) else ""
        raise ConfigError(
            f"data.batch_size={batch_size!r} conflicts with global_batch_size={global_batch}, which gives {derived} "
            f"per device over {world_size} devices ({cfg.trainer.num_nodes} nodes × {cfg.trainer.devices}). Keep "
            f"one: drop the data.batch_size override (or set data.batch_size={derived}), or set {other}or "
            f"global_batch_size=null to give data.batch_size per device."
        )
    with open_dict(cfg):
        cfg.data.batch_size = derived


def _check_data_paths(cfg: DictConfig) -> None:
    """A shard folder or pattern that is not there fails here, not in trainer.fit after the model is built
    (a few stats per source; remote sources are left to the loader, see check_sources_exist)."""
    data = cfg.get("data")
    if not isinstance(data, DictConfig):
        return
    for key in ("train_shards", "val_shards"):
        if key not in data.keys():  # (`in data` is False for a ??? value too)
            continue  # data=synthetic has no shards
        if OmegaConf.is_missing(data, key):
            raise ConfigError(
                f"data.{key} is not set: give data.{key}=/data/cc3m (a folder of shards with sizes.json), a brace "
                f"pattern such as '/data/cc3m/{{00000..00331}}.tar', a glob or a pipe: command."
            )
        spec = data[key]
        if spec is None and key == "val_shards":
            continue
        spec = list(spec) if OmegaConf.is_list(spec) else spec
        try:
            check_sources_exist(spec, f"data.{key}")
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(str(error)) from None


def _free_run_name(run_dir: Path) -> str:
    """The first ``<name>-<n>`` beside ``run_dir`` that holds no checkpoints."""
    for n in range(2, 1000):
        name = f"{run_dir.name}-{n}"
        if not find_resume_checkpoint(run_dir.parent / name):
            return name
    return f"{run_dir.name}-new"


def check_resume(cfg: DictConfig, run_dir: str | os.PathLike) -> None:
    """``resume=none`` must not start over a run directory that holds checkpoints (two runs' checkpoints
    would mix, and ``last`` would be ambiguous); ``resume=PATH`` must exist. ``resume=auto`` always can."""
    resume, run_dir = cfg.get("resume"), Path(run_dir)
    if resume in (None, "none"):
        existing = find_resume_checkpoint(run_dir)
        if not existing:
            return
        name = _free_run_name(run_dir)
        new_run = (
            f"run_name={name} to train anew in {run_dir.parent / name}"
            if cfg.get("run_name") is not None and str(cfg.get("run_name")) == run_dir.name
            else "another run_name (or paths.run_dir) to train anew elsewhere"
        )
        raise ConfigError(
            f"resume=none but {run_dir} already holds checkpoints ({existing}), and a fresh start there would mix "
            f"two runs. Add one override: {new_run}, or resume=auto to continue the run in {run_dir} (or delete "
            f"{run_dir} to start it over)."
        )
    if resume != "auto" and not Path(str(resume)).exists():  # a file, or a DeepSpeed/sharded-FSDP folder
        raise ConfigError(
            f"resume={resume!r}: no such checkpoint file or folder (relative paths are taken from the current "
            f"directory {os.getcwd()}); give an existing one, resume=auto (the newest in the run directory) or "
            f"resume=none."
        )


def _check_resume(cfg: DictConfig) -> None:
    check_resume(cfg, cfg.paths.run_dir)


class RefuseBeforeTheRunDirectory(Callback):
    """Run ``prepare_config`` before Hydra makes the run directory (conf/train.yaml, ``hydra.callbacks``).

    Hydra's ``run_job`` creates the run directory, opens ``train.log`` there and writes
    ``.hydra/{config,hydra,overrides}.yaml`` before it calls the task function: a run refused in the
    task function has already overwritten those files, e.g. ``resume=none`` over a finished run (the
    demo's command run twice) replaced the record of what that run ran. ``on_run_start`` comes before
    all that, with the composed config. The task function checks again (``train(cfg)`` is also called
    directly); a ``--multirun`` job gets a fresh directory of its own, so its checks stay there.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # What run_job does first, so the run directory (and any ${hydra:…} in the config) resolves to the
        # same value here and there (`now` resolves once per config: the timestamp is shared too).
        HydraConfig.instance().set_config(config)
        run_dir = os.path.abspath(str(OmegaConf.select(config, "hydra.run.dir")))
        with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = run_dir
        HydraConfig.instance().set_config(config)
        cfg = copy.deepcopy(config)
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
            cfg.paths.run_dir = run_dir  # as clip_pl.train's task function pins it
        disabled = logging.root.manager.disable
        logging.disable(logging.WARNING)  # the task function's own checks warn, into the run's train.log
        try:
            prepare_config(cfg)
        except ConfigError as error:
            # Hydra turns an exception in a callback into a warning and runs the job anyway; SystemExit is
            # not an Exception, so it ends the process here, with the message (and status 1, as Hydra's own).
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                traceback.print_exc()
            raise SystemExit(f"{type(error).__name__}: {error}") from None
        finally:
            logging.disable(disabled)


def _model_architecture(cfg: DictConfig) -> dict:
    """The open_clip architecture config the model group describes (its architecture keys only)."""
    arch_keys = [
        name
        for name, p in inspect.signature(resolve_model_config).parameters.items()
        if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    model = OmegaConf.to_container(cfg.model, resolve=True)
    return resolve_model_config(**{k: model[k] for k in arch_keys if k in model})


def _check_model_architecture(cfg: DictConfig) -> None:
    """A bad architecture fails now, not after the data is listed. (Unknown model keys were refused
    by ``_check_targets``: the model group's schema is the signature of its ``_target_``.)"""
    try:
        _model_architecture(cfg)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _check_targets(cfg: DictConfig) -> None:
    """Every ``_target_`` must exist and accept the keys its node gives it."""
    nodes: list[tuple[str, Any]] = [
        (name, cfg.get(name)) for name in ("model", "data", "loss", "optim", "scheduler", "trainer", "strategy")
    ]
    for group in ("logger", "callbacks"):
        nodes += [(f"{group}.{k}", v) for k, v in (cfg.get(group) or {}).items()]
    nodes += [(f"eval.callbacks.{k}", v) for k, v in ((cfg.get("eval") or {}).get("callbacks") or {}).items()]
    for where, node in nodes:
        if isinstance(node, DictConfig) and "_target_" not in node and "." in where:
            raise ConfigError(
                f"{where} has no _target_: an override named a {where.split('.')[0]} entry "
                f"that the chosen config does not define (set {where}=null to drop it)."
            )
        if isinstance(node, DictConfig) and "_target_" not in node:
            raise ConfigError(
                f"{where} has no _target_: a {where} config names what builds it, and its keys are "
                f"that callable's arguments (see clip_pl/conf/{where}/; a {where} file of your own "
                f"can extend one of them through `defaults:`)."
            )
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        try:
            target = get_method(node._target_)
        except Exception as error:
            raise ConfigError(f"{where}._target_={node._target_!r} cannot be imported: {error}") from None
        signature = inspect.signature(target.__init__ if inspect.isclass(target) else target)
        if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            continue
        unknown = {k for k in node if not k.startswith("_")} - set(signature.parameters)
        if where == "optim":  # the tower LR keys are CLIPModule's (clip_pl.towers), taken off before instantiation
            unknown -= set(TOWER_LR_KEYS)
        if unknown:
            valid = sorted(set(signature.parameters) - {"self"})
            raise ConfigError(f"Unknown key(s) {sorted(unknown)} for {where} ({node._target_}); valid: {valid}.")


def _slurm_tasks_per_node() -> int | None:
    """SLURM's tasks per node for a batch job, or None outside one (an interactive shell too)."""
    if "SLURM_NTASKS_PER_NODE" not in os.environ or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    match = re.match(r"\d+", os.environ["SLURM_NTASKS_PER_NODE"])  # "8" or "8(x4)"
    return int(match.group()) if match else None


def _check_topology(cfg: DictConfig) -> None:
    tasks_per_node = _slurm_tasks_per_node()
    if tasks_per_node is None:
        return
    if cfg.trainer.devices != tasks_per_node:
        raise ConfigError(
            f"trainer.devices={cfg.trainer.devices} but SLURM runs {tasks_per_node} tasks per node: Lightning "
            f"needs one task per device. Set trainer.devices={tasks_per_node} or sbatch "
            f"--ntasks-per-node={cfg.trainer.devices} (slurm/*.sh pass SLURM's values for you)."
        )
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", cfg.trainer.num_nodes)))
    if cfg.trainer.num_nodes != nodes:
        raise ConfigError(
            f"trainer.num_nodes={cfg.trainer.num_nodes} but the SLURM job has {nodes} nodes; "
            f"set trainer.num_nodes={nodes}."
        )


def _check_precision_and_strategy(cfg: DictConfig) -> None:
    precision = str(cfg.trainer.precision)
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r}; choose one of {sorted(PRECISIONS)}.")
    if precision == "16-mixed" and (uses_deepspeed(cfg) or uses_fsdp(cfg)):
        raise ConfigError(
            "trainer.precision=16-mixed needs loss scaling, which clip_pl runs only under DDP; with "
            "DeepSpeed or FSDP use trainer.precision=bf16-mixed (no scaling needed) or 32."
        )
    offload = cfg.strategy.get("offload_optimizer") or cfg.strategy.get("offload_parameters")
    if uses_deepspeed(cfg) and offload and not _is_deepspeed_cpu_adam(cfg.optim):
        raise ConfigError(
            f"strategy=deepspeed_*_offload moves the optimizer to CPU, where DeepSpeed runs only "
            f"its own CPU Adam: use optim=deepspeed_cpu_adamw (the offload strategies select it unless "
            f"an override names another optim), not {cfg.optim.get('_target_')}."
        )
    if (uses_deepspeed(cfg) or uses_fsdp(cfg)) and cfg.model.compile:
        raise ConfigError(
            "model.compile=true is only run with strategy=ddp here; DeepSpeed and FSDP have not been "
            "tested with torch.compile in clip_pl."
        )
    if cfg.trainer.get("accumulate_grad_batches", 1) != 1:
        raise ConfigError(
            "trainer.accumulate_grad_batches would contrast each micro-batch only against itself, shrinking the "
            "contrastive batch. Keep it at 1 and set model.grad_cache_chunks=k: k chunks per device batch, "
            "negatives across all chunks of all ranks, memory of one chunk."
        )


def _check_batch(cfg: DictConfig) -> None:
    batch_size, chunks = cfg.data.batch_size, cfg.model.grad_cache_chunks
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"data.batch_size={batch_size!r} must be a positive integer (per device).")
    if chunks < 1 or batch_size % chunks:
        raise ConfigError(f"model.grad_cache_chunks={chunks} must be >= 1 and divide data.batch_size={batch_size}.")


def _check_loss(cfg: DictConfig) -> None:
    from clip_pl.loss import SigLipLoss

    if instantiates(cfg.loss, SigLipLoss) and cfg.model.init_logit_bias is None:
        raise ConfigError("loss=siglip learns a logit bias: set model.init_logit_bias=-10 (SigLIP's init).")


def _check_schedule(cfg: DictConfig) -> None:
    scheduler = cfg.get("scheduler") or {}
    warmup, max_steps = scheduler.get("warmup_steps", 0), cfg.trainer.max_steps
    if cfg.trainer.fast_dev_run or max_steps is None or max_steps < 0:
        return
    cooldown = scheduler.get("cooldown_steps", 0)
    if cooldown and warmup + cooldown > max_steps:
        raise ConfigError(
            f"scheduler.warmup_steps + cooldown_steps = {warmup + cooldown} exceed "
            f"trainer.max_steps={max_steps}; shorten them or raise trainer.max_steps."
        )
    if warmup >= max_steps:  # legitimate for a smoke run, a mistake for a real one: say so loudly
        log.warning(
            "scheduler.warmup_steps=%d is not below trainer.max_steps=%d: the whole run is warmup "
            "(the learning rate never reaches optim.lr).",
            warmup,
            max_steps,
        )


def _check_towers_and_ema(cfg: DictConfig) -> None:
    """Tower locks (model.lock_*), tower LRs (optim.*_lr_scale, *_layer_decay) and callbacks.ema."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    sharded = cfg.strategy._target_ if uses_deepspeed(cfg) or uses_fsdp(cfg) else None
    try:
        check_tower_options(
            _model_architecture(cfg),
            {k: model[k] for k in LOCK_KEYS if k in model},
            split_tower_lr(OmegaConf.to_container(cfg.optim, resolve=True))[1],
            sharded,
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if (model.get("lock_image") or model.get("lock_text")) and not model.get("init_checkpoint"):
        log.warning(
            "model.lock_image/lock_text with no model.init_checkpoint: the locked tower keeps its random "
            "initialisation (LiT locks a pre-trained tower: set model.init_checkpoint=FILE)."
        )
    ema = (cfg.get("callbacks") or {}).get("ema")
    if ema is not None and ema.get("enabled"):
        from clip_pl.callbacks.ema import check_ema_options

        try:
            check_ema_options(ema.get("decay"), ema.get("start_step"), sharded)
        except ValueError as error:
            raise ConfigError(str(error)) from None
