"""Composing clip_pl's packaged configs in tests: the smoke recipe and smaller towers."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from clip_pl.config_dir import config_dir

CONF = Path(config_dir())
CPU_TINY = ["debug=smoke", "data.batch_size=4", "data.num_samples=64"]  # clip_pl/conf/debug/smoke.yaml, smaller


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def make_cfg(overrides: list[str], tmp_path: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.root_dir={tmp_path}", "run_name=test", *overrides])


# model=tiny, narrowed further: the matrix checks the loop and the loader, not the towers.
SMALLER = [
    "model.arch_config.embed_dim=32",
    "model.arch_config.vision_cfg.width=32",
    "model.arch_config.vision_cfg.layers=1",
    "model.arch_config.vision_cfg.head_width=16",
    "model.arch_config.text_cfg.width=32",
    "model.arch_config.text_cfg.heads=2",
    "model.arch_config.text_cfg.layers=1",
]
