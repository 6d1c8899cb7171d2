"""Export a clip_pl checkpoint as a Hugging Face ``transformers`` CLIP directory.

    python -m clip_pl.interchange export-hf runs/x/checkpoints/last.ckpt hf_clip/
    # then, offline, without clip_pl or open_clip:
    #   from transformers import CLIPModel, CLIPProcessor
    #   model = CLIPModel.from_pretrained("hf_clip"); processor = CLIPProcessor.from_pretrained("hf_clip")

OpenCLIP has no such export (its issues #766, #591, #382) and transformers' own conversion script
fails on open_clip checkpoints (transformers #28072), hence this module.

The directory holds ``config.json`` (a ``CLIPConfig``), ``model.safetensors`` (fp32), the tokenizer
files built from open_clip's BPE vocabulary (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
``special_tokens_map.json``) and ``preprocessor_config.json`` (a ``CLIPImageProcessor`` doing
open_clip's eval preprocessing). Every file is written by hand, so exporting needs neither
``transformers`` nor ``tokenizers``; the tests load the result with ``transformers``.

Only architectures that ``CLIPModel`` computes exactly are exported; anything else (ModifiedResNet
or timm image towers, attentional pooling, layer scale, a SigLIP ``logit_bias`` …) raises
``UnsupportedArchitectureError`` naming every reason, before anything is written.

Tokenizer: ``CLIPTokenizer`` gives open_clip's ids for ordinary text, but its normaliser is fixed
(transformers 5: NFC, whitespace, per-character lower-casing): it does not run ``ftfy.fix_text`` nor
``html.unescape`` as open_clip does, and its lower-casing knows no word-final sigma. Text with HTML
entities (``&amp;``), mojibake, curly quotes, ligatures, full-width forms or upper-case Greek is
tokenised differently; pass ``clip_tokenizer_input(text)`` instead of ``text`` for open_clip's ids
exactly (tests: 1 000 varied captions, all identical).
Padded positions hold end-of-text (49407), not 0 (see PAD_TOKEN).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import basic_clean, whitespace_clean
from safetensors.torch import save_file

HF_WEIGHTS_NAME = "model.safetensors"
# open_clip's special tokens and the names Hugging Face's CLIPTokenizer (and OpenAI's vocab) use.
HF_BOS, HF_EOS = "<|startoftext|>", "<|endoftext|>"
_SPECIAL_RENAMES = {"<start_of_text>": HF_BOS, "<end_of_text>": HF_EOS}
# open_clip pads token rows with id 0, the byte token "!". It cannot be the pad token here: every
# special token becomes an "added token" that the tokenizer cuts out of the input text first, so
# "wow!!" would become [..., 0, 0] instead of open_clip's "!!</w>" (id 748). End-of-text is the pad
# token instead (as in OpenAI's own Hugging Face release): padded ids then read 49407 where
# open_clip's read 0, everything up to the first end-of-text is identical, and CLIPModel's output is
# the same, because the text is causal and pooled at the first end-of-text, before any padding.
PAD_TOKEN = HF_EOS
_PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as open_clip's eval transform resizes


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture is one that transformers' CLIPModel cannot compute exactly."""


@dataclass
class HFExport:
    directory: Path
    config: dict  # config.json as written


@lru_cache(maxsize=1)
def _open_clip_tokenizer() -> open_clip.SimpleTokenizer:
    """The tokenizer clip_pl trains with (clip_pl.model.get_tokenizer); its vocabulary ships in open_clip."""
    return open_clip.SimpleTokenizer()


# --------------------------------------------------------------------------- what CLIPModel can express


def _vision_cfg(model_config: Mapping[str, Any]) -> CLIPVisionCfg:
    return CLIPVisionCfg(**model_config.get("vision_cfg", {}))


def _text_cfg(model_config: Mapping[str, Any]) -> CLIPTextCfg:
    return CLIPTextCfg(**model_config.get("text_cfg", {}))


# Block options of open_clip's CustomResidualAttentionBlock: CLIPEncoderLayer has none of them.
_CUSTOM_BLOCK_FLAGS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")


def _common_tower_reasons(tower: str, cfg: CLIPVisionCfg | CLIPTextCfg) -> list[str]:
    reasons = []
    if cfg.ls_init_value is not None:
        reasons.append(f"{tower}: layer scale (ls_init_value={cfg.ls_init_value}); CLIPEncoderLayer has no layer scale")
    if cfg.block_type not in (None, "default"):
        reasons.append(f"{tower}: block_type={cfg.block_type!r}; only open_clip's default residual block maps to CLIP")
    flags = [flag for flag in _CUSTOM_BLOCK_FLAGS if getattr(cfg, flag)]
    if flags:
        reasons.append(f"{tower}: attention/MLP variants {flags}; CLIPEncoderLayer has none of them")
    if cfg.act_kwargs:
        reasons.append(f"{tower}: act_kwargs={cfg.act_kwargs}; CLIP's hidden_act is plain gelu or quick_gelu")
    if cfg.norm_kwargs and set(cfg.norm_kwargs) != {"eps"}:
        reasons.append(f"{tower}: norm_kwargs={cfg.norm_kwargs}; only LayerNorm's eps maps to layer_norm_eps")
    return reasons


def _square(value: Any, what: str, reasons: list[str]) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            reasons.append(f"vision: non-square {what} {tuple(value)}; CLIPVisionConfig takes one {what}")
        return int(value[0])
    return int(value)


def _vision_reasons(cfg: CLIPVisionCfg) -> list[str]:
    if cfg.timm_model_name:
        return [f"vision: timm image tower {cfg.timm_model_name!r}; CLIPModel's image tower is a plain ViT"]
    if isinstance(cfg.layers, (tuple, list)):
        return [
            f"vision: ModifiedResNet image tower (layers={list(cfg.layers)}, as in RN50); CLIPModel's image "
            f"tower is a ViT (CLIPVisionModel), so the ResNet and its attention pooling cannot be expressed"
        ]
    reasons = _common_tower_reasons("vision", cfg)
    if cfg.attentional_pool:
        reasons.append("vision: attentional pooling (attentional_pool); CLIP pools the class token")
    elif cfg.pool_type != "tok":
        reasons.append(f"vision: pool_type={cfg.pool_type!r}; CLIP pools the class token ('tok')")
    if cfg.no_ln_pre:
        reasons.append("vision: no_ln_pre=True; CLIPVisionTransformer always applies pre_layrnorm")
    _square(cfg.image_size, "image_size", reasons)
    _square(cfg.patch_size, "patch_size", reasons)
    return reasons


def _text_reasons(cfg: CLIPTextCfg, tokenizer: open_clip.SimpleTokenizer) -> list[str]:
    if cfg.hf_model_name:
        return [f"text: Hugging Face text tower {cfg.hf_model_name!r}; CLIPModel's text tower is CLIP's transformer"]
    reasons = _common_tower_reasons("text", cfg)
    if cfg.embed_cls:
        reasons.append("text: a learned CLS embedding (embed_cls, as in CoCa); CLIPTextModel has none")
    if cfg.no_causal_mask:
        reasons.append("text: no causal mask; CLIPTextModel always attends causally")
    eos_pooling = cfg.pool_type == "eos" and cfg.eos_id == tokenizer.eot_token_id
    if cfg.pool_type != "argmax" and not eos_pooling:
        reasons.append(
            f"text: pool_type={cfg.pool_type!r} (eos_id={cfg.eos_id}); CLIPTextModel pools at the "
            f"end-of-text token (open_clip's 'argmax')"
        )
    if cfg.proj_type != "linear" or cfg.proj_bias:
        reasons.append(
            f"text: projection proj_type={cfg.proj_type!r}, proj_bias={cfg.proj_bias}; CLIP's "
            f"text_projection is one bias-free linear map"
        )
    if cfg.vocab_size != tokenizer.vocab_size:
        reasons.append(
            f"text: vocab_size={cfg.vocab_size}, but the exported tokenizer is open_clip's CLIP BPE "
            f"with {tokenizer.vocab_size} tokens"
        )
    return reasons


def unsupported_reasons(
    model_config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor] | None = None
) -> list[str]:
    """Why CLIPModel cannot compute this architecture exactly (an empty list: it can)."""
    reasons = _vision_reasons(_vision_cfg(model_config)) + _text_reasons(
        _text_cfg(model_config), _open_clip_tokenizer()
    )
    has_bias = model_config.get("init_logit_bias") is not None or (
        state_dict is not None and "logit_bias" in state_dict
    )
    if has_bias:
        reasons.append(
            "a learned logit_bias (sigmoid/SigLIP training); CLIPModel's logits have no bias term, so "
            "its probabilities would silently differ"
        )
    return reasons


def check_exportable(model_config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
    reasons = unsupported_reasons(model_config, state_dict)
    if reasons:
        raise UnsupportedArchitectureError(
            "this checkpoint cannot be exported to transformers' CLIPModel:\n  - "
            + "\n  - ".join(reasons)
            + "\nExport it to open_clip instead: python -m clip_pl.interchange export CHECKPOINT OUT_DIR"
        )


# --------------------------------------------------------------------------- config.json


def _layer_norm_eps(cfg: CLIPVisionCfg | CLIPTextCfg) -> float:
    return float((cfg.norm_kwargs or {}).get("eps", 1e-5))  # open_clip's LayerNorm is torch's default


def hf_config(model_config: Mapping[str, Any], logit_scale: float) -> dict:
    """config.json of a CLIPModel with this architecture."""
    vision, text = _vision_cfg(model_config), _text_cfg(model_config)
    embed_dim = int(model_config["embed_dim"])
    hidden_act = "quick_gelu" if model_config.get("quick_gelu", False) else "gelu"  # "gelu" is exact (erf)
    tokenizer = _open_clip_tokenizer()
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": embed_dim,
        "logit_scale_init_value": logit_scale,  # only for fresh models; the weights carry the trained one
        "dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": text.vocab_size,
            "hidden_size": text.width,
            "intermediate_size": int(text.width * text.mlp_ratio),  # open_clip: int(d_model * mlp_ratio)
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "max_position_embeddings": text.context_length,
            "hidden_act": hidden_act,
            "layer_norm_eps": _layer_norm_eps(text),
            "projection_dim": embed_dim,
            # open_clip pools at argmax(ids): the first end-of-text, the highest id. CLIPTextModel pools at
            # the first eos_token_id (argmax only for the legacy eos_token_id == 2, wrong once a token is added).
            "bos_token_id": tokenizer.sot_token_id,
            "eos_token_id": tokenizer.eot_token_id,
            "pad_token_id": tokenizer.eot_token_id,  # the tokenizer's pad token (see PAD_TOKEN)
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": vision.width,
            "intermediate_size": int(vision.width * vision.mlp_ratio),
            "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.width // vision.head_width,  # as open_clip's _build_vision_tower
            "image_size": _square(vision.image_size, "image_size", []),
            "patch_size": _square(vision.patch_size, "patch_size", []),
            "num_channels": 3,
            "hidden_act": hidden_act,
            "layer_norm_eps": _layer_norm_eps(vision),
            "projection_dim": embed_dim,
        },
    }


# --------------------------------------------------------------------------- weights


def _encoder_layers(source: dict, prefix: str, target: str) -> dict[str, torch.Tensor]:
    """open_clip `{prefix}transformer.resblocks.i.*` -> HF `{target}.encoder.layers.i.*` (pops the sources)."""
    out = {}
    i = 0
    while f"{prefix}transformer.resblocks.{i}.ln_1.weight" in source:
        block, layer = f"{prefix}transformer.resblocks.{i}.", f"{target}.encoder.layers.{i}."
        # nn.MultiheadAttention keeps q, k, v stacked in one (3W, W) matrix; CLIPAttention has three Linears.
        for kind in ("weight", "bias"):
            # (clone: three views of one storage would be "shared tensors" to safetensors)
            q, k, v = (t.clone() for t in source.pop(f"{block}attn.in_proj_{kind}").chunk(3, dim=0))
            out.update(
                {
                    f"{layer}self_attn.q_proj.{kind}": q,
                    f"{layer}self_attn.k_proj.{kind}": k,
                    f"{layer}self_attn.v_proj.{kind}": v,
                }
            )
        for old, new in (
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            for kind in ("weight", "bias"):
                out[f"{layer}{new}.{kind}"] = source.pop(f"{block}{old}.{kind}")
        i += 1
    return out


def _layer_norm(source: dict, old: str, new: str) -> dict[str, torch.Tensor]:
    return {f"{new}.{kind}": source.pop(f"{old}.{kind}") for kind in ("weight", "bias")}


def hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CLIP weights (CustomTextCLIP's `text.` prefix allowed) -> CLIPModel weights, fp32.

    Raises ValueError if any open_clip weight is left unmapped: a silently dropped tensor would mean
    CLIPModel computes something else.
    """
    source = {
        (k[len("text.") :] if k.startswith("text.") else k): v.detach().float().cpu() for k, v in state_dict.items()
    }
    out = {
        "vision_model.embeddings.patch_embedding.weight": source.pop("visual.conv1.weight"),  # no bias in either
        "vision_model.embeddings.class_embedding": source.pop("visual.class_embedding"),
        "vision_model.embeddings.position_embedding.weight": source.pop("visual.positional_embedding"),
        # x @ proj (open_clip) == Linear with weight proj.T (HF)
        "visual_projection.weight": source.pop("visual.proj").T,
        "text_model.embeddings.token_embedding.weight": source.pop("token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight": source.pop("positional_embedding"),
        "text_projection.weight": source.pop("text_projection").T,
        "logit_scale": source.pop("logit_scale").reshape(()),  # 1-element when trained sharded
    }
    out.update(_layer_norm(source, "visual.ln_pre", "vision_model.pre_layrnorm"))  # sic: HF's spelling
    out.update(_layer_norm(source, "visual.ln_post", "vision_model.post_layernorm"))
    out.update(_layer_norm(source, "ln_final", "text_model.final_layer_norm"))
    out.update(_encoder_layers(source, "visual.", "vision_model"))
    out.update(_encoder_layers(source, "", "text_model"))
    source.pop("attn_mask", None)  # the causal mask: a buffer, rebuilt by CLIPTextModel
    if source:
        raise ValueError(
            f"open_clip weights without a CLIPModel counterpart: {sorted(source)[:12]}; "
            f"this architecture is not plain CLIP."
        )
    return {k: v.contiguous() for k, v in out.items()}


# --------------------------------------------------------------------------- tokenizer and image processor


def tokenizer_files(context_length: int) -> dict[str, str]:
    """File name -> text of a CLIPTokenizer equal to open_clip's SimpleTokenizer (ships in open_clip_torch)."""
    simple = _open_clip_tokenizer()
    vocab = {_SPECIAL_RENAMES.get(token, token): index for token, index in simple.encoder.items()}
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.__getitem__)  # line order is the merge rank
    special = {"bos_token": HF_BOS, "eos_token": HF_EOS, "unk_token": HF_EOS, "pad_token": PAD_TOKEN}
    added = {
        str(vocab[token]): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in (HF_BOS, HF_EOS)
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "processor_class": "CLIPProcessor",
        "model_max_length": context_length,  # truncation=True keeps open_clip's context length
        "padding_side": "right",
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        **special,
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
    }


def clip_tokenizer_input(text: str) -> str:
    """The text to give CLIPTokenizer for open_clip's ids exactly: open_clip's cleaning (ftfy.fix_text,
    HTML unescaping, whitespace) that CLIPTokenizer's fixed normaliser cannot express.

    Lower-casing is left to CLIPTokenizer, because lower-casing here could leave a decomposed sequence
    (upper-case polytonic Greek: "Η͂" -> "ῆ") that its NFC would then recompose into another token. The
    one letter its per-character lower-casing gets wrong is a word-final capital sigma (Python: "ς",
    tokenizers: "σ"), so capital sigmas alone are lower-cased here, by Python's context-aware lower()."""
    cleaned = whitespace_clean(basic_clean(text))  # ftfy's output is NFC: CLIPTokenizer's NFC keeps it
    lowered = cleaned.lower()
    kept, position = [], 0
    for character in cleaned:
        kept.append(lowered[position] if character == "Σ" else character)
        position += len(character.lower())  # lower() may lengthen a character ("İ" -> "i̇")
    return "".join(kept)


def image_processor_config(image_size: int) -> dict:
    """CLIPImageProcessor doing clip_pl's eval transform: bicubic shortest-edge resize, centre crop,
    OpenAI mean/std (clip_pl.model.image_transforms)."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": _PIL_BICUBIC,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(OPENAI_DATASET_MEAN),
        "image_std": list(OPENAI_DATASET_STD),
        "do_convert_rgb": True,
    }


# --------------------------------------------------------------------------- the export


def write_hf_directory(model_config: Mapping[str, Any], model: torch.nn.Module, out_dir: str | Path) -> HFExport:
    """Write a directory that transformers' CLIPModel / CLIPProcessor.from_pretrained load offline, from
    an open_clip model built from ``model_config`` (``clip_pl.interchange.export_hf`` reads a checkpoint
    and calls this: checkpoint files are interchange's, this module only knows the transformers side)."""
    check_exportable(model_config, model.state_dict())  # before writing anything
    weights = hf_state_dict(model.state_dict())
    config = hf_config(model_config, float(weights["logit_scale"]))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / HF_WEIGHTS_NAME), metadata={"format": "pt"})  # "pt": transformers checks it
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, text in tokenizer_files(config["text_config"]["max_position_embeddings"]).items():
        (out_dir / name).write_text(text, encoding="utf-8")
    image_size = config["vision_config"]["image_size"]
    (out_dir / "preprocessor_config.json").write_text(json.dumps(image_processor_config(image_size), indent=2) + "\n")
    return HFExport(directory=out_dir, config=config)
