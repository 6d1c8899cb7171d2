"""Move CLIP weights between clip_pl checkpoints and the open_clip / OpenAI world.

    # clip_pl training checkpoint -> open_clip (weights + JSON config in OUT_DIR, a new or empty folder;
    # --overwrite replaces a previous export there)
    python -m clip_pl.interchange export runs/x/checkpoints/last.ckpt exported/
    # then, in Python:  open_clip.create_model("ViT-B-32", pretrained="exported/open_clip_pytorch_model.bin")
    #   or, for any arch (custom ones included):  open_clip.create_model("local-dir:exported")

    # open_clip / OpenAI weights file -> clip_pl checkpoint (for clip_pl.load and python -m clip_pl.eval)
    python -m clip_pl.interchange import weights.pt ViT-B-32 converted.ckpt     # or ARCH = a config .json

    # a sharded checkpoint folder (DeepSpeed ZeRO, or FSDP with state_dict_type=sharded) -> one file
    python -m clip_pl.interchange consolidate runs/x/checkpoints/last.ckpt/ last_fp32.ckpt

From Python: ``load_open_clip_weights(model, path)`` initialises a freshly built model (continued
pre-training, fine-tuning); ``export_open_clip(checkpoint, out_dir)``; ``read_clip_pl_checkpoint``;
``read_model_checkpoint`` (any of the formats below, or an exported directory, into architecture + weights).
This module owns every checkpoint and weights format; ``clip_pl.inference`` and ``clip_pl.eval`` read through it.

Weight files that are read (everything through ``torch.load(weights_only=True)`` or safetensors):
  * open_clip's saved ``model.state_dict()`` (``.pt``/``.bin``/``.pth``) or ``.safetensors``;
  * a dict holding it under ``state_dict`` (open_clip_train's checkpoints), ``module.`` prefixes
    (DDP) stripped;
  * a clip_pl (Lightning) checkpoint: the ``model.`` weights are taken, other entries ignored;
  * OpenAI's released TorchScript archives (``ViT-B-32.pt`` …): read with ``torch.jit.load``,
    which rebuilds tensors without Python pickle; only the state dict is used, no TorchScript code
    is run. Pass ``allow_torchscript=False`` to refuse them. OpenAI's models use QuickGELU, so
    build the matching ``*-quickgelu`` architecture.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from clip_pl import hf_export
from clip_pl.model import build_clip, resolve_model_config, restore_scalar_shapes

log = logging.getLogger(__name__)

# Name open_clip's `local-dir:` loader looks for first among .bin files.
OPEN_CLIP_WEIGHTS_NAME = "open_clip_pytorch_model.bin"
OPEN_CLIP_SAFETENSORS_NAME = "open_clip_model.safetensors"
OPEN_CLIP_DIR_CONFIG = "open_clip_config.json"
# Integers OpenAI's TorchScript models keep as attributes; they are not weights.
_OPENAI_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size")
_MODEL_PREFIX = "model."
EMA_STATE_KEY = "EMA"  # checkpoint["callbacks"][EMA_STATE_KEY]: clip_pl.callbacks.ema.EMA's state


class NoEMAWeightsError(ValueError):
    """The EMA weights were asked for (``--ema``) and the checkpoint has none."""


def ema_state_dict(checkpoint: Mapping[str, Any], prefix: str = _MODEL_PREFIX) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict with the EMA weights (callbacks.ema) in place of the trained ones."""
    state = (checkpoint.get("callbacks") or {}).get(EMA_STATE_KEY)
    if not state:
        raise NoEMAWeightsError(
            "this checkpoint holds no EMA weights: only a run trained with callbacks.ema.enabled=true keeps them "
            "(python -m clip_pl.train … callbacks.ema.enabled=true); export its trained weights without --ema."
        )
    state_dict = dict(checkpoint["state_dict"])
    for name, value in state["ema"].items():
        key = prefix + name
        state_dict[key] = value.to(state_dict[key].dtype).reshape(state_dict[key].shape)
    return state_dict


_COMPILE_INFIX = "_orig_mod."  # torch.compile wraps the module: `model._orig_mod.visual...`
_MAX_LISTED = 12


class ArchitectureMismatchError(ValueError):
    """The weights in a file do not fit the model's architecture."""


@dataclass
class ClipPlCheckpoint:
    model_config: dict
    arch: str | None
    state_dict: dict[str, torch.Tensor]


@dataclass
class OpenClipExport:
    model_name: str  # what to pass to open_clip.create_model (after add_model_config for custom archs)
    weights: Path
    config_json: Path  # bare architecture JSON: open_clip.add_model_config(config_json) registers model_name
    directory: Path  # also loadable as open_clip.create_model(f"local-dir:{directory}")
    named_arch: bool  # True: open_clip.create_model(model_name, pretrained=weights) works without a JSON


# --------------------------------------------------------------------------- reading files


def _require_file(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{what} {str(path)!r} does not exist; check the path (relative paths "
            f"are taken from the current directory {str(Path.cwd())!r})."
        )
    return path


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _torch_load(path: Path) -> Any:
    # mmap: a training checkpoint's optimizer state (2x the weights) is never read into memory.
    mmap = zipfile.is_zipfile(path)  # torch.save's default format; legacy files cannot be mapped
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # pickle.UnpicklingError for arbitrary objects; keep torch's detail
        raise ValueError(
            f"{str(path)!r} could not be read with torch.load(weights_only=True): {err}\n"
            f"clip_pl only reads tensors and plain Python values from checkpoints. Re-save the "
            f"weights as a plain state dict: torch.save(model.state_dict(), path)."
        ) from err


def _strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def _clip_pl_model_weights(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The open_clip weights inside a Lightning state dict: `model.` keys, prefix removed."""
    weights = {
        k[len(_MODEL_PREFIX) :].replace(_COMPILE_INFIX, ""): v
        for k, v in state_dict.items()
        if k.startswith(_MODEL_PREFIX)
    }
    if not weights:
        raise ValueError(
            "the checkpoint's state_dict has no `model.*` entries: it is not a clip_pl "
            "training checkpoint (the LightningModule keeps the CLIP model as `self.model`)."
        )
    return weights


def read_state_dict(path: str | Path, allow_torchscript: bool = True) -> dict[str, torch.Tensor]:
    """Read CLIP weights from any supported file (see the module docstring), keys in open_clip naming."""
    path = _require_file(path, "weights file")
    if path.is_dir():
        path = _weights_in_dir(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict: Any = load_file(str(path), device="cpu")
    elif _is_torchscript_archive(path):
        if not allow_torchscript:
            raise ValueError(
                f"{str(path)!r} is a TorchScript archive (OpenAI's release format) and "
                f"allow_torchscript=False; convert it to a state dict first."
            )
        log.info("reading the state dict of TorchScript archive %s (its code is not run)", path)
        state_dict = torch.jit.load(str(path), map_location="cpu").state_dict()
        for key in _OPENAI_NON_WEIGHTS:
            state_dict.pop(key, None)
    else:
        state_dict = _torch_load(path)
    if isinstance(state_dict, Mapping) and "state_dict" in state_dict:
        is_clip_pl = "hyper_parameters" in state_dict or any(
            str(k).startswith(_MODEL_PREFIX) for k in state_dict["state_dict"]
        )
        state_dict = state_dict["state_dict"]
        if is_clip_pl:
            state_dict = _clip_pl_model_weights(state_dict)
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError(
            f"{str(path)!r} holds no state dict (found {type(state_dict).__name__}); "
            f"expected a mapping of parameter names to tensors."
        )
    if all(str(k).startswith("module.") for k in state_dict):
        state_dict = _strip_prefix(state_dict, "module.")
    non_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise ValueError(
            f"{str(path)!r}: entries {non_tensors[:_MAX_LISTED]} are not tensors; this is not a weights file."
        )
    return dict(state_dict)


def _weights_in_dir(directory: Path) -> Path:
    for name in (OPEN_CLIP_SAFETENSORS_NAME, OPEN_CLIP_WEIGHTS_NAME):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"{str(directory)!r} is a directory without {OPEN_CLIP_WEIGHTS_NAME} or "
        f"{OPEN_CLIP_SAFETENSORS_NAME}; pass the weights file itself."
    )


# --------------------------------------------------------------------------- loading into a model


def _adapt_to_model(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Small, lossless format differences between open_clip versions and OpenAI's release."""
    state_dict = dict(state_dict)
    expected = model.state_dict()
    # Old open_clip checkpoints keep text weights at the top level even for CustomTextCLIP.
    if (
        "positional_embedding" in state_dict
        and "positional_embedding" not in expected
        and "text.positional_embedding" in expected
    ):
        state_dict = open_clip.model.convert_to_custom_text_state_dict(state_dict)
    # Non-persistent buffers (the causal attention mask) appear in TorchScript state dicts.
    persistent = set(expected)
    for name, _ in model.named_buffers():
        if name not in persistent:
            state_dict.pop(name, None)
    # A locked image tower's BatchNorm layers are open_clip's FrozenBatchNorm2d (freeze_batch_norm_2d),
    # which keep no `num_batches_tracked`: its checkpoints lack the counter. It only steers BatchNorm
    # built with momentum=None (open_clip's is not) and never inference, so it restarts at 0.
    for name, tensor in expected.items():
        if name.endswith(".num_batches_tracked") and name not in state_dict:
            state_dict[name] = torch.zeros(tensor.shape, dtype=tensor.dtype)
    for key in ("logit_scale", "logit_bias"):  # scalar vs 1-element parameter across versions
        if key in state_dict and key in expected and state_dict[key].numel() == expected[key].numel():
            state_dict[key] = state_dict[key].reshape(expected[key].shape)
    return state_dict


def check_compatible(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "the weights") -> None:
    """Raise ArchitectureMismatchError naming every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or shapes):
        return
    lines = [f"{source} do not fit this architecture."]
    for title, items in (
        ("shape mismatches", shapes),
        ("missing from the file", missing),
        ("in the file but not in the model", unexpected),
    ):
        if items:
            more = f" … and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
            lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:_MAX_LISTED]) + more)
    lines.append(
        "Build the model with the architecture the weights were trained with (model.arch / "
        "model.arch_config, image_size, context_length; OpenAI weights need a *-quickgelu arch)."
    )
    raise ArchitectureMismatchError("\n".join(lines))


def load_open_clip_weights(model: nn.Module, path: str | Path, allow_torchscript: bool = True) -> None:
    """Load an open_clip / OpenAI / clip_pl weights file into ``model`` (an open_clip CLIP), strictly.

    Raises FileNotFoundError for a missing file and ArchitectureMismatchError (a ValueError) listing
    the keys and shapes that differ, before any weight is changed.
    """
    state_dict = _adapt_to_model(model, read_state_dict(path, allow_torchscript=allow_torchscript))
    check_compatible(model, state_dict, source=f"the weights in {str(path)!r}")
    model.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------- clip_pl checkpoints


def consolidate_checkpoint(checkpoint_dir: str | Path, out_path: str | Path) -> Path:
    """One clip_pl checkpoint file from a sharded checkpoint folder: DeepSpeed ZeRO (any stage) or
    FSDP's torch.distributed.checkpoint folder. The file keeps ``hyper_parameters`` and fp32 model
    weights in open_clip's shapes, so clip_pl.load, evaluation and export read it like any other.

    The whole model is gathered in this process's CPU memory; no process group is needed.
    """
    checkpoint_dir, out_path = Path(checkpoint_dir), Path(out_path)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(
            f"{str(checkpoint_dir)!r} is not a checkpoint folder (a single-file checkpoint needs no consolidation)."
        )
    if (checkpoint_dir / "latest").is_file() or (checkpoint_dir / "checkpoint").is_dir():
        # Lightning's converter gathers the ZeRO partitions into fp32 weights and keeps the rest.
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        checkpoint = convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir, out_path)
    elif any(checkpoint_dir.glob("*.distcp")):
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        checkpoint = _load_distributed_checkpoint(checkpoint_dir)
        checkpoint = {k: v for k, v in checkpoint.items() if not k.startswith("optimizer_")}
    else:
        raise ValueError(
            f"{str(checkpoint_dir)!r} holds neither a DeepSpeed checkpoint ('latest', 'checkpoint/') "
            f"nor torch.distributed.checkpoint shards (*.distcp)."
        )
    # Sharded training holds the temperature and bias as 1-element vectors; open_clip's are 0-d.
    restore_scalar_shapes(checkpoint["state_dict"], prefix=_MODEL_PREFIX)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out_path)
    return out_path


def read_clip_pl_checkpoint(path: str | Path, ema: bool = False) -> ClipPlCheckpoint:
    """Architecture and model weights of a clip_pl (Lightning) checkpoint, read with weights_only=True.
    ``ema``: the EMA weights that callbacks.ema kept in the checkpoint (clip_pl.callbacks.ema) instead."""
    path = _require_file(path, "checkpoint")
    if path.is_dir():
        raise ValueError(
            f"{str(path)!r} is a directory. A sharded DeepSpeed/FSDP checkpoint must be "
            f"consolidated into one file first: "
            f"python -m clip_pl.interchange consolidate DIR OUT.ckpt; "
            f"an exported open_clip directory loads with clip_pl.load(directory)."
        )
    checkpoint = _torch_load(path)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    if not isinstance(hparams, Mapping) or "model_config" not in hparams or "state_dict" not in checkpoint:
        raise ValueError(
            f"{str(path)!r} is not a clip_pl training checkpoint (no hyper_parameters.model_config). "
            f"For an open_clip/OpenAI weights file give the architecture: clip_pl.load(path, arch='ViT-B-32'), "
            f"or convert it: python -m clip_pl.interchange import {path} ARCH out.ckpt"
        )
    if ema:
        try:
            checkpoint["state_dict"] = ema_state_dict(checkpoint, prefix=_MODEL_PREFIX)
        except NoEMAWeightsError as error:
            raise NoEMAWeightsError(f"{str(path)!r}: {error}") from None
    return ClipPlCheckpoint(
        model_config=copy.deepcopy(dict(hparams["model_config"])),
        arch=hparams.get("arch"),
        state_dict=_clip_pl_model_weights(checkpoint["state_dict"]),
    )


def read_model_checkpoint(checkpoint: str | Path, arch: str | Mapping[str, Any] | None = None) -> ClipPlCheckpoint:
    """Architecture + weights from a clip_pl checkpoint, an exported directory, or weights + ``arch``."""
    path = Path(checkpoint).expanduser()
    if path.is_dir() and (path / OPEN_CLIP_DIR_CONFIG).is_file() and arch is None:
        model_config = json.loads((path / OPEN_CLIP_DIR_CONFIG).read_text())["model_cfg"]
        return ClipPlCheckpoint(model_config, None, read_state_dict(path))
    if arch is None:
        return read_clip_pl_checkpoint(path)
    if isinstance(arch, str):
        return ClipPlCheckpoint(resolve_model_config(arch=arch), arch, read_state_dict(path))
    return ClipPlCheckpoint(resolve_model_config(arch_config=arch), None, read_state_dict(path))


def build_from_checkpoint(checkpoint: ClipPlCheckpoint) -> nn.Module:
    """A fresh open_clip model with the checkpoint's architecture and weights (strict)."""
    model = build_clip(checkpoint.model_config)
    state_dict = _adapt_to_model(model, checkpoint.state_dict)
    check_compatible(model, state_dict, source="the checkpoint's weights")
    model.load_state_dict(state_dict, strict=True)
    return model


def save_clip_pl_checkpoint(
    model: nn.Module, model_config: Mapping[str, Any], path: str | Path, arch: str | None = None
) -> Path:
    """Write a minimal clip_pl checkpoint (for clip_pl.load / evaluation; not for resuming training)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "hyper_parameters": {"model_config": json.loads(json.dumps(dict(model_config))), "arch": arch},
        "state_dict": {_MODEL_PREFIX + k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    torch.save(checkpoint, path)
    return path


# --------------------------------------------------------------------------- export to open_clip


def _inference_config(model_config: Mapping[str, Any]) -> dict:
    """The architecture without training-only settings (patch dropout is off at inference anyway)."""
    config = json.loads(json.dumps(dict(model_config)))
    config.get("vision_cfg", {}).pop("patch_dropout", None)
    return config


def _matches_named_arch(arch: str | None, model_config: Mapping[str, Any]) -> bool:
    """Would open_clip.create_model(arch) build exactly this architecture?"""
    if not arch or open_clip.get_model_config(arch) is None:
        return False
    return _inference_config(resolve_model_config(arch=arch)) == _inference_config(model_config)


def _is_export_file(path: Path) -> bool:
    """A file that export_open_clip writes: the weights, open_clip_config.json, an architecture <name>.json."""
    return path.is_file() and (
        path.name in (OPEN_CLIP_WEIGHTS_NAME, OPEN_CLIP_SAFETENSORS_NAME) or path.suffix == ".json"
    )


def check_export_dir(out_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """Refuse an export into a folder that is not empty: the old files would stay beside the new ones
    (a stale ``<name>.json`` of another architecture, or the other weights format, which open_clip would
    then load). With ``overwrite``, a previous export's files are returned, to be deleted before writing;
    anything else in the folder is still refused (``overwrite`` replaces an export, nothing more)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{str(out_dir)!r} is a file; export into a folder (a new or empty one).")
    entries = sorted(out_dir.iterdir()) if out_dir.is_dir() else []
    if not entries:
        return []
    names = ", ".join(p.name for p in entries[:_MAX_LISTED]) + (" …" if len(entries) > _MAX_LISTED else "")
    if not overwrite:
        raise FileExistsError(
            f"{str(out_dir)!r} is not empty ({names}): exporting into it would leave those files beside the new "
            f"ones (open_clip could then load a stale architecture or weights file). Export into a new or empty "
            f"folder, or pass --overwrite (overwrite=True) to replace a previous export there."
        )
    others = [p.name for p in entries if not _is_export_file(p)]
    if others:
        raise FileExistsError(
            f"{str(out_dir)!r} holds files that no export writes ({', '.join(others[:_MAX_LISTED])}); --overwrite "
            f"only replaces a previous export (its weights and *.json). Export into a new or empty folder."
        )
    return entries


def export_open_clip(
    checkpoint: str | Path | ClipPlCheckpoint,
    out_dir: str | Path,
    name: str | None = None,
    safetensors: bool = False,
    overwrite: bool = False,
) -> OpenClipExport:
    """Write weights + configs that open_clip loads without clip_pl.

    ``out_dir`` receives the weights (``open_clip_pytorch_model.bin``, or ``open_clip_model.safetensors``),
    ``open_clip_config.json`` (for ``create_model("local-dir:OUT_DIR")``) and ``<model_name>.json``
    (the bare architecture, for ``open_clip.add_model_config``). When the checkpoint's architecture
    is exactly an open_clip one, ``model_name`` is that name and
    ``open_clip.create_model(model_name, pretrained=weights)`` works directly; otherwise (a custom
    arch, a changed image size …) ``model_name`` is ``name`` or ``<arch or clip_pl>-custom``.

    ``out_dir`` must be new or empty (FileExistsError, before the checkpoint is read); ``overwrite=True``
    replaces a previous export there once the checkpoint has been read and checked (``check_export_dir``).
    """
    stale = check_export_dir(out_dir, overwrite)
    if not isinstance(checkpoint, ClipPlCheckpoint):
        checkpoint = read_clip_pl_checkpoint(checkpoint)
    with torch.device("meta"):  # shapes only: validating needs no initialised (or allocated) weights
        skeleton = build_clip(checkpoint.model_config)
    state_dict = _adapt_to_model(skeleton, checkpoint.state_dict)
    check_compatible(skeleton, state_dict, source="the checkpoint's weights")
    named = name is None and _matches_named_arch(checkpoint.arch, checkpoint.model_config)
    model_name = checkpoint.arch if named else (name or f"{checkpoint.arch or 'clip_pl'}-custom")
    if "/" in model_name or model_name.endswith(".json"):
        raise ValueError(f"export name {model_name!r} must be a plain name (it becomes <name>.json).")
    out_dir = Path(out_dir)
    for path in stale:
        path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if safetensors:
        from safetensors.torch import save_file

        weights = out_dir / OPEN_CLIP_SAFETENSORS_NAME
        save_file(state_dict, str(weights))
    else:
        weights = out_dir / OPEN_CLIP_WEIGHTS_NAME
        torch.save(state_dict, weights)
    config = _inference_config(checkpoint.model_config)
    arch_json = out_dir / f"{model_name}.json"
    arch_json.write_text(json.dumps(config, indent=2) + "\n")
    # open_clip_config.json lacks top-level embed_dim, so add_model_config(out_dir) skips it.
    (out_dir / OPEN_CLIP_DIR_CONFIG).write_text(json.dumps({"model_cfg": config}, indent=2) + "\n")
    return OpenClipExport(
        model_name=model_name, weights=weights, config_json=arch_json, directory=out_dir, named_arch=named
    )


def import_open_clip(weights: str | Path, arch: str, out_path: str | Path) -> Path:
    """Turn an open_clip/OpenAI weights file into a clip_pl checkpoint.

    ``arch`` is an open_clip architecture name or the path of an architecture JSON (as written by
    ``export_open_clip`` or shipped in open_clip's model_configs/).
    """
    if arch.endswith(".json"):
        config = json.loads(_require_file(arch, "architecture JSON").read_text())
        model_config, arch_name = resolve_model_config(arch_config=config.get("model_cfg", config)), None
    else:
        model_config, arch_name = resolve_model_config(arch=arch), arch
    model = build_clip(model_config)
    load_open_clip_weights(model, weights)
    return save_clip_pl_checkpoint(model, model_config, out_path, arch=arch_name)


def export_hf(checkpoint: str | Path | ClipPlCheckpoint, out_dir: str | Path) -> hf_export.HFExport:
    """A clip_pl checkpoint as a transformers CLIPModel/CLIPProcessor directory (``clip_pl.hf_export``)."""
    if not isinstance(checkpoint, ClipPlCheckpoint):
        checkpoint = read_clip_pl_checkpoint(checkpoint)
    hf_export.check_exportable(checkpoint.model_config, checkpoint.state_dict)  # before building the model
    model = build_from_checkpoint(checkpoint)  # strict: the weights fit the architecture
    return hf_export.write_hf_directory(checkpoint.model_config, model, out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clip_pl.interchange", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="clip_pl checkpoint -> open_clip weights + configs")
    exp.add_argument("checkpoint")
    exp.add_argument("out_dir")
    exp.add_argument("--name", default=None, help="model name for custom architectures")
    exp.add_argument("--safetensors", action="store_true")
    exp.add_argument("--ema", action="store_true", help="the EMA weights (callbacks.ema) instead of the trained ones")
    exp.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous export in OUT_DIR (refused if it holds other files)",
    )
    imp = sub.add_parser("import", help="open_clip/OpenAI weights -> clip_pl checkpoint")
    imp.add_argument("weights")
    imp.add_argument(
        "arch", help="open_clip architecture name, e.g. ViT-B-32 (OpenAI: ViT-B-32-quickgelu), or an architecture .json"
    )
    imp.add_argument("out_path")
    cons = sub.add_parser("consolidate", help="a sharded DeepSpeed or FSDP checkpoint folder -> one clip_pl .ckpt file")
    cons.add_argument("checkpoint_dir")
    cons.add_argument("out_path")
    hf = sub.add_parser("export-hf", help="clip_pl checkpoint -> transformers CLIPModel/CLIPProcessor directory")
    hf.add_argument("checkpoint")
    hf.add_argument("out_dir")
    hf.add_argument("--ema", action="store_true", help="the EMA weights (callbacks.ema) instead of the trained ones")
    args = parser.parse_args(argv)
    try:
        _run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        # What was given cannot be used (a path, a checkpoint without EMA weights, a non-empty folder …): the
        # message says why and what to do; a traceback would bury it. Status 2, as for argparse's own errors.
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(args: argparse.Namespace) -> None:
    if args.command == "export":  # before the checkpoint is read: a refused folder costs nothing
        check_export_dir(args.out_dir, args.overwrite)
    if getattr(args, "ema", False):
        args.checkpoint = read_clip_pl_checkpoint(args.checkpoint, ema=True)
    if args.command == "export-hf":
        out = export_hf(args.checkpoint, args.out_dir).directory
        print(f"CLIPModel.from_pretrained({str(out)!r}); CLIPProcessor.from_pretrained({str(out)!r})")
        return
    if args.command == "export":
        result = export_open_clip(
            args.checkpoint, args.out_dir, name=args.name, safetensors=args.safetensors, overwrite=args.overwrite
        )
        if result.named_arch:
            print(f"open_clip.create_model({result.model_name!r}, pretrained={str(result.weights)!r})")
        else:
            print(
                f"open_clip.add_model_config({str(result.config_json)!r})\n"
                f"open_clip.create_model({result.model_name!r}, pretrained={str(result.weights)!r})"
            )
        print(f"or: open_clip.create_model('local-dir:{result.directory}')")
    elif args.command == "import":
        print(import_open_clip(args.weights, args.arch, args.out_path))
    else:
        print(consolidate_checkpoint(args.checkpoint_dir, args.out_path))


if __name__ == "__main__":
    main()
