"""Evaluate a checkpoint: zero-shot classification, retrieval, or a task list (eval=suite); prints a table, writes JSON.

    python -m clip_pl.eval checkpoint=runs/x/checkpoints/last.ckpt eval=demo_digits
    python -m clip_pl.eval checkpoint=last.ckpt eval=imagenet_zeroshot paths.imagenet_val_dir=/data/val
    python -m clip_pl.eval checkpoint=last.ckpt eval=retrieval paths.retrieval_shards='/data/coco/{0000..0004}.tar'
    python -m clip_pl.eval checkpoint=ViT-B-32.pt arch=ViT-B-32-quickgelu eval=imagenet_zeroshot   # OpenAI weights
    python -m clip_pl.eval checkpoint=last.ckpt eval=suite eval.task_list=demo_out/tasks.yaml   # a task list
    torchrun --nproc-per-node 8 -m clip_pl.eval checkpoint=… eval=…       # sharded over 8 GPUs

The config is clip_pl/conf/eval_app.yaml; every task is a callback under ``eval.callbacks`` (the same ones
training runs), evaluated once here. JSON goes to ``output_json`` (default: next to the checkpoint,
``<checkpoint stem>.eval-<eval choice>.json``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from clip_pl.cli_args import quote_brace_patterns
from clip_pl.config_dir import config_dir
from clip_pl.distributed import rank_and_world_size
from clip_pl.eval.report import write_json
from clip_pl.interchange import build_from_checkpoint, read_model_checkpoint

CONF_DIR = config_dir()  # clip_pl/conf, inside the package


def _device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _autocast(precision: str, device: torch.device):
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext
    if precision not in dtypes:
        raise ValueError(f"precision={precision!r}: choose auto, fp32, bf16 or fp16.")
    return lambda: torch.autocast(device.type, dtype=dtypes[precision])


def _init_distributed(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def run(cfg: DictConfig, eval_choice: str = "eval") -> dict[str, Any]:
    """Evaluate every task of cfg.eval.callbacks; return the JSON payload (rank 0 writes it)."""
    tasks = cfg.eval.get("callbacks") or {}
    if not tasks:
        raise ValueError(
            f"eval={eval_choice} defines no evaluation (eval.callbacks is empty); choose e.g. "
            f"eval=demo_digits, eval=imagenet_zeroshot or eval=retrieval."
        )
    overrides = {k: cfg[k] for k in ("batch_size", "num_workers") if cfg.get(k) is not None}
    # Build every task first: bad class lists or missing data fail before the model is loaded.
    callbacks = {name: instantiate(spec, **overrides) for name, spec in tasks.items()}
    device = _device(cfg.device)
    _init_distributed(device)
    loaded = read_model_checkpoint(
        cfg.checkpoint, OmegaConf.to_container(cfg.arch) if OmegaConf.is_config(cfg.arch) else cfg.arch
    )
    model = build_from_checkpoint(loaded).to(device)
    autocast = _autocast(cfg.precision, device)
    results = {name: cb.evaluate(model, loaded.model_config, autocast=autocast) for name, cb in callbacks.items()}
    payload = {
        "checkpoint": str(Path(cfg.checkpoint).resolve()),
        "arch": loaded.arch,
        "eval": eval_choice,
        "world_size": rank_and_world_size()[1],
        "results": results,
    }
    if rank_and_world_size()[0] == 0:
        print("\n\n".join(callbacks[name].table(metrics) for name, metrics in results.items()))
        checkpoint = Path(cfg.checkpoint)
        output = cfg.output_json or checkpoint.with_name(f"{checkpoint.stem}.eval-{eval_choice}.json")
        print(f"wrote {write_json(output, payload)}")
    return payload


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval_app")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg, eval_choice=HydraConfig.get().runtime.choices.get("eval", "eval"))
    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    # paths.retrieval_shards=/data/{0000..0004}.tar as the shell leaves it: quoted for Hydra (clip_pl/cli_args.py)
    sys.argv[1:] = quote_brace_patterns(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
