"""Config-time decisions look at the class a ``_target_`` builds, never at the end of its string."""

from __future__ import annotations

import pytest
from omegaconf import open_dict

from clip_pl.config_checks import ConfigError, prepare_config, target_class, uses_deepspeed, uses_fsdp
from clip_pl.loss import SigLipLoss
from tests.support.config import CPU_TINY, choices, make_cfg


class Sigmoid(SigLipLoss):
    """A SigLIP loss under a name that ends in neither 'SigLipLoss' nor anything the old checks knew."""


@pytest.mark.parametrize("strategy", choices("strategy"))
def test_strategy_kind_comes_from_the_class_it_builds(strategy, tmp_path):
    cfg = make_cfg([*CPU_TINY, f"strategy={strategy}"], tmp_path)
    assert uses_deepspeed(cfg) == strategy.startswith("deepspeed")
    assert uses_fsdp(cfg) == (strategy == "fsdp")


def test_a_builder_function_is_known_by_its_return_annotation(tmp_path):
    cfg = make_cfg([*CPU_TINY, "strategy=deepspeed_stage_1"], tmp_path)
    from lightning.pytorch.strategies import DeepSpeedStrategy

    assert target_class(cfg.strategy) is DeepSpeedStrategy  # clip_pl.strategies.deepspeed_strategy -> DeepSpeedStrategy


def test_a_siglip_subclass_needs_a_logit_bias_whatever_its_name(tmp_path):
    cfg = make_cfg(CPU_TINY, tmp_path)
    with open_dict(cfg):
        cfg.loss._target_ = f"{__name__}.Sigmoid"
    with pytest.raises(ConfigError, match="init_logit_bias"):
        prepare_config(cfg)


def test_offload_accepts_deepspeeds_cpu_adam(tmp_path):
    cfg = make_cfg([*CPU_TINY, "strategy=deepspeed_stage_2_offload"], tmp_path)  # selects optim=deepspeed_cpu_adamw
    prepare_config(cfg)


def test_the_wandb_logger_gets_the_runs_stable_id_and_one_process_ddp_runs_plainly(tmp_path):
    from clip_pl.assembly import build_loggers, build_trainer, wandb_run_id

    cfg = make_cfg([*CPU_TINY, "logger=wandb", "logger.wandb.offline=true"], tmp_path)
    prepare_config(cfg)
    run_dir = tmp_path / "runs" / "test"
    wandb = [logger for logger in build_loggers(cfg, run_dir) if type(logger).__name__ == "WandbLogger"]
    assert len(wandb) == 1 and wandb[0]._wandb_init["id"] == wandb_run_id(run_dir)
    from lightning.pytorch.strategies import SingleDeviceStrategy

    assert isinstance(build_trainer(make_cfg(CPU_TINY, tmp_path), run_dir).strategy, SingleDeviceStrategy)
