"""CLIP score of every downloaded pair: cosine similarity of the image and caption embeddings of an
open_clip model, batched, on the GPU when there is one. Written beside the shards so that any cut
(`data_prep.curate.cut`) needs no rescoring.

The model is any open_clip model: `local-dir:FOLDER` (what `python -m clip_pl.interchange export`
writes from a clip_pl checkpoint), or a named architecture plus `pretrained=` a weights file.
This package never imports clip_pl.

Per shard `NAME.tar`, `SCORES/NAME.parquet` (SCORES defaults to `SHARDS/_scores`) holds one row per
sample: shard, key, caption, clip_score (NaN when not scored), status (`scored`, `no_image`,
`undecodable_image`, `missing_caption`) and image_embedding (float16, L2-normalised; reused by
`dedup`). `SCORES/info.json` records the model. A shard whose scores file exists is skipped, so an
interrupted run resumes; a different model in the same folder is refused.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from data_prep.curate.shardio import image_of, iter_samples, keys_in_tar, shard_names

SCORES_DIR = "_scores"  # a sub-folder: img2dataset's resume parses every top-level *.json of the shard folder


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model: str, pretrained: str | None = None, device: str | None = None):
    """(model in eval mode, image preprocess, tokenizer, device) of an open_clip model."""
    import open_clip  # noqa: PLC0415 - heavy; only the scoring commands need it

    device = device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device; pass --device cpu")
    if model.startswith("local-dir:") and not (Path(model[len("local-dir:") :]) / "open_clip_config.json").is_file():
        raise FileNotFoundError(
            f"{model}: no open_clip_config.json there; export a clip_pl checkpoint with "
            f"`python -m clip_pl.interchange export CKPT FOLDER` and pass local-dir:FOLDER"
        )
    if pretrained is not None and not Path(pretrained).is_file():
        raise FileNotFoundError(f"{pretrained}: no such weights file (nothing is downloaded here)")
    if not model.startswith("local-dir:") and pretrained is None:
        raise ValueError(f"model {model!r} without --pretrained would score with random weights; pass the weights file")
    clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
    clip.eval()
    return clip, preprocess, open_clip.get_tokenizer(model), torch.device(device)


def _decode(image_bytes: bytes | None, preprocess) -> tuple[torch.Tensor | None, str]:
    if image_bytes is None:
        return None, "no_image"
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            return preprocess(image.convert("RGB")), "scored"
    except Exception:  # PIL raises many types for broken bytes; all mean the same here  # noqa: BLE001
        return None, "undecodable_image"


@torch.no_grad()
def _score_batch(clip, tokenizer, device, images: list[torch.Tensor], captions: list[str]):
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    with autocast:
        image_features = clip.encode_image(torch.stack(images).to(device))
        text_features = clip.encode_text(tokenizer(captions).to(device))
    image_features = torch.nn.functional.normalize(image_features.float(), dim=-1)
    text_features = torch.nn.functional.normalize(text_features.float(), dim=-1)
    return (image_features * text_features).sum(-1).cpu().numpy(), image_features.half().cpu().numpy()


def score_shard(tar_path: Path, clip, preprocess, tokenizer, device, batch_size: int) -> pd.DataFrame:
    rows, pending = [], []  # pending: (row index, image tensor, caption) waiting for a full batch

    def flush():
        scores, embeddings = _score_batch(clip, tokenizer, device, [p[1] for p in pending], [p[2] for p in pending])
        for (index, _, _), score, embedding in zip(pending, scores, embeddings):
            rows[index]["clip_score"], rows[index]["image_embedding"] = float(score), embedding
        pending.clear()

    for key, files in iter_samples(tar_path):
        caption = files["txt"].decode("utf-8", errors="replace") if "txt" in files else None
        tensor, status = _decode(image_of(files), preprocess)
        if status == "scored" and not (caption or "").strip():
            tensor, status = None, "missing_caption"
        rows.append(
            {
                "shard": tar_path.stem,
                "key": key,
                "caption": caption,
                "clip_score": float("nan"),
                "status": status,
                "image_embedding": None,
            }
        )
        if tensor is not None:
            pending.append((len(rows) - 1, tensor, caption))
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    return pd.DataFrame(rows, columns=["shard", "key", "caption", "clip_score", "status", "image_embedding"])


def score_shards(
    shards_dir: str | Path,
    model: str,
    pretrained: str | None = None,
    scores_dir: str | Path | None = None,
    batch_size: int = 256,
    device: str | None = None,
) -> dict:
    """Score every shard that has no scores file yet; returns the run's summary (also in info.json)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    names = shard_names(shards_dir)
    scores_dir = Path(scores_dir) if scores_dir else Path(shards_dir) / SCORES_DIR
    identity = {"model": model, "pretrained": pretrained}
    info_path = scores_dir / "info.json"
    if info_path.exists():
        earlier = json.loads(info_path.read_text())
        if {k: earlier.get(k) for k in identity} != identity:
            raise FileExistsError(
                f"{scores_dir} holds scores by {earlier.get('model')} ({earlier.get('pretrained')}); "
                f"give another --scores folder for {model}"
            )
    clip, preprocess, tokenizer, device_used = load_model(model, pretrained, device)
    scores_dir.mkdir(parents=True, exist_ok=True)
    todo = [name for name in names if not (scores_dir / f"{name}.parquet").exists()]
    started, scored, samples = time.perf_counter(), 0, 0
    for name in todo:
        frame = score_shard(Path(shards_dir) / f"{name}.tar", clip, preprocess, tokenizer, device_used, batch_size)
        tmp = scores_dir / f"{name}.parquet.tmp"
        frame.to_parquet(tmp, index=False)
        tmp.replace(scores_dir / f"{name}.parquet")  # atomic: a half-written file is never taken as done
        scored += int((frame["status"] == "scored").sum())
        samples += len(frame)
    seconds = time.perf_counter() - started
    info = {
        **identity,
        "device": str(device_used),
        "batch_size": batch_size,
        "shards": len(names),
        "shards_scored_this_run": len(todo),
        "this_run": {
            "samples": samples,
            "scored": scored,
            "seconds": round(seconds, 3),
            "images_per_second": round(scored / seconds, 1) if seconds and scored else None,
        },
    }
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


def read_scores(scores_dir: Path, names: list[str], shards_dir: Path) -> pd.DataFrame:
    """The scores of the samples that are in the shards now (a cut's output keeps the original scores)."""
    missing = [name for name in names if not (scores_dir / f"{name}.parquet").exists()]
    if missing:
        raise FileNotFoundError(
            f"{scores_dir}: no scores for shard(s) {missing[:5]}{' …' if len(missing) > 5 else ''}; "
            f"run `python -m data_prep.curate score` first"
        )
    frames = []
    for name in names:
        frame = pd.read_parquet(scores_dir / f"{name}.parquet")
        present = keys_in_tar(Path(shards_dir) / f"{name}.tar")
        unscored = present - set(frame["key"])
        if unscored:
            raise ValueError(
                f"{scores_dir / name}.parquet has no score for {len(unscored)} sample(s) of {name}.tar "
                f"(e.g. {sorted(unscored)[:3]}); these scores belong to other shards: rescore them"
            )
        frames.append(frame[frame["key"].isin(present)])
    return pd.concat(frames, ignore_index=True)


def embeddings_of(scores: pd.DataFrame) -> np.ndarray:
    """The scored rows' image embeddings as one float32 matrix (rows in the order of `scores`)."""
    return np.stack(scores["image_embedding"].to_numpy()).astype(np.float32)
