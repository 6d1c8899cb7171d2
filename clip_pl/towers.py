"""Tower control: lock a tower (LiT, fine-tuning) and give each tower and each depth its own LR.

    python -m clip_pl.train experiment=lit_demo                      # locked image tower, LiT style
    python -m clip_pl.train debug=smoke model.lock_text=true model.lock_text_unlocked_layers=1
    python -m clip_pl.train debug=smoke optim.image_layer_decay=0.75 optim.text_lr_scale=0.5

Locking uses open_clip's own ``lock_image_tower`` / ``lock_text_tower`` (the meanings of OpenCLIP's
``--lock-image-unlocked-groups`` and ``--lock-text-unlocked-layers``); a locked parameter has
``requires_grad=False``, so ``CLIPModule.parameter_groups`` leaves it out of the optimizer (no state,
no update) and DDP neither buckets nor reduces it. Locked BatchNorm layers (ModifiedResNet) become
open_clip's ``FrozenBatchNorm2d``, which has no running-statistics update to switch off, so Lightning's
``model.train()`` each epoch cannot undo the lock.

Layer-wise LR decay (OpenCLIP ``--image-layer-decay``, BEiT/big_vision): within a ViT tower, depth 0 is
the embeddings, block i is depth i + 1, the final norm and projection are the last depth L + 1; a
parameter's lr is ``base × decay^(L + 1 − depth) × tower scale``. The temperature and logit bias keep
the base lr. Groups carry ``lr_scale``; ``apply_lr_scales`` multiplies each group's lr once, before
the scheduler is built, and LambdaLR then multiplies each group's own initial lr, so warmup and cosine
keep every ratio.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

# conf/optim keys that are not the optimizer's: clip_pl.assembly takes them off before instantiating it.
TOWER_LR_KEYS = ("image_lr_scale", "text_lr_scale", "image_layer_decay", "text_layer_decay")
TOWER_LR_DEFAULTS = {key: 1.0 for key in TOWER_LR_KEYS}
LOCK_KEYS = ("lock_image", "lock_image_unlocked_groups", "lock_text", "lock_text_unlocked_layers")


def split_tower_lr(optim: Mapping[str, Any]) -> tuple[dict, dict]:
    """(the optimizer's own keys, the tower LR keys with their defaults filled in)."""
    own = {k: v for k, v in optim.items() if k not in TOWER_LR_KEYS}
    return own, {**TOWER_LR_DEFAULTS, **{k: float(v) for k, v in optim.items() if k in TOWER_LR_KEYS}}


def check_tower_options(
    model_config: Mapping[str, Any], lock: Mapping[str, Any], tower_lr: Mapping[str, float], sharded: str | None = None
) -> None:
    """Raise ValueError (with the fix) for options that cannot work; ``sharded`` names a sharded strategy."""
    for key in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
        value = lock.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(
                f"model.{key}={value!r} must be an integer >= 0 (how many of the last groups/layers stay trainable)."
            )
    for key in ("image_layer_decay", "text_layer_decay"):
        if not 0.0 < tower_lr[key] <= 1.0:
            raise ValueError(f"optim.{key}={tower_lr[key]} must be in (0, 1] (1: no layer-wise decay).")
    for key in ("image_lr_scale", "text_lr_scale"):
        if not tower_lr[key] >= 0.0:
            raise ValueError(
                f"optim.{key}={tower_lr[key]} must be >= 0 (0 keeps the tower still, but a lock "
                f"(model.lock_*) also drops its optimizer state)."
            )
    vision, text = model_config.get("vision_cfg") or {}, model_config.get("text_cfg") or {}
    vit = not isinstance(vision.get("layers"), (list, tuple)) and not vision.get("timm_model_name")
    plain_text = not text.get("hf_model_name")
    if (lock.get("lock_image") or tower_lr["image_layer_decay"] != 1.0) and vision.get("timm_model_name"):
        raise ValueError(
            "model.lock_image / optim.image_layer_decay: clip_pl handles open_clip's own image towers "
            f"(ViT, ModifiedResNet), not the timm tower {vision['timm_model_name']!r}."
        )
    if lock.get("lock_image") and not vit and lock.get("lock_image_unlocked_groups", 0):
        raise ValueError(
            "model.lock_image_unlocked_groups > 0 needs a ViT image tower: open_clip locks a "
            "ModifiedResNet (RN50 …) only as a whole; set it to 0."
        )
    if tower_lr["image_layer_decay"] != 1.0 and not vit:
        raise ValueError(
            "optim.image_layer_decay needs a ViT image tower (blocks to count depth by); "
            "for a ModifiedResNet keep it at 1.0 and use optim.image_lr_scale."
        )
    if (lock.get("lock_text") or tower_lr["text_layer_decay"] != 1.0) and not plain_text:
        raise ValueError(
            "model.lock_text / optim.text_layer_decay: clip_pl handles open_clip's own text "
            f"transformer, not the Hugging Face tower {text['hf_model_name']!r}."
        )
    uses_towers = (
        lock.get("lock_image")
        or lock.get("lock_text")
        or any(tower_lr[k] != TOWER_LR_DEFAULTS[k] for k in TOWER_LR_KEYS)
    )
    if uses_towers and sharded:
        raise ValueError(
            f"model.lock_* and the optim tower LR keys are tested only under DDP (and one device); "
            f"strategy {sharded} flattens or wraps parameters before the optimizer groups are built, "
            f"which clip_pl has not verified for per-parameter groups. Use strategy=ddp."
        )


def lock_towers(model: nn.Module, lock: Mapping[str, Any]) -> None:
    """open_clip's own locking, with BatchNorm statistics frozen in a locked image tower."""
    if lock.get("lock_image"):
        model.lock_image_tower(unlocked_groups=int(lock.get("lock_image_unlocked_groups", 0)), freeze_bn_stats=True)
    if lock.get("lock_text"):
        model.lock_text_tower(unlocked_layers=int(lock.get("lock_text_unlocked_layers", 0)), freeze_layer_norm=True)


def _text_prefix(model: nn.Module) -> str:
    return "text." if hasattr(model, "text") else ""  # CustomTextCLIP nests the text tower


def tower_depth(model: nn.Module, name: str) -> tuple[str | None, int, int]:
    """(tower, depth, last depth) of an open_clip parameter name; (None, 0, 0) outside the towers."""
    if name.startswith("visual."):
        layers = len(model.visual.transformer.resblocks) if hasattr(model.visual, "transformer") else 0
        match = re.match(r"visual\.transformer\.resblocks\.(\d+)\.", name)
        if match:
            return "image", int(match.group(1)) + 1, layers + 1
        embeddings = (
            "visual.conv1.",
            "visual.class_embedding",
            "visual.positional_embedding",
            "visual.ln_pre.",
            "visual.patch_dropout",
        )
        return "image", 0 if name.startswith(embeddings) else layers + 1, layers + 1
    prefix = _text_prefix(model)
    text = model.text if prefix else model
    if name.startswith(prefix) and name not in ("logit_scale", "logit_bias"):
        layers = len(text.transformer.resblocks)
        match = re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.", name)
        if match:
            return "text", int(match.group(1)) + 1, layers + 1
        embeddings = tuple(prefix + e for e in ("token_embedding", "positional_embedding", "cls_emb"))
        return "text", 0 if name.startswith(embeddings) else layers + 1, layers + 1
    return None, 0, 0


def lr_scale_of(model: nn.Module, name: str, tower_lr: Mapping[str, float]) -> float:
    tower, depth, last = tower_depth(model, name)
    if tower is None:
        return 1.0  # temperature / logit bias: the base lr
    return tower_lr[f"{tower}_lr_scale"] * tower_lr[f"{tower}_layer_decay"] ** (last - depth)


def tower_parameter_groups(
    model: nn.Module, named: Iterable[tuple[str, nn.Parameter]], no_decay: set[str], tower_lr: Mapping[str, float]
) -> list[dict[str, Any]]:
    """One group per (lr scale, weight decay or not), trainable parameters only, in a fixed order.

    ``named`` gives (open_clip name, parameter) pairs; ``no_decay`` the names without weight decay.
    """
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in named:
        if param.requires_grad:
            key = (lr_scale_of(model, name, tower_lr), name in no_decay)
            groups.setdefault(key, []).append(param)
    return [
        {"params": params, "lr_scale": scale, **({"weight_decay": 0.0} if exempt else {})}
        for (scale, exempt), params in sorted(groups.items(), key=lambda kv: (kv[0][1], -kv[0][0]))
    ]


def apply_lr_scales(optimizer: torch.optim.Optimizer) -> None:
    """Each group's lr = the optimizer's lr × its ``lr_scale`` (before any scheduler records initial_lr)."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The schedule's lr before any tower scale: what ``train/lr`` reports. Group 0 may be a scaled
    tower group, so its lr is divided by its ``lr_scale`` (1 without tower LR keys)."""
    group = optimizer.param_groups[0]
    return float(group["lr"]) / group.get("lr_scale", 1.0)
