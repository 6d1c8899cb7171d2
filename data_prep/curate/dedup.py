"""Near-duplicate removal on image embeddings: copies within the corpus (re-encoded, resized, the
same picture at another URL) and corpus images that copy an evaluation set's images.

The embeddings are those `data_prep.curate.score` stored beside the shards (L2-normalised image
embeddings of its model), searched with faiss (exact inner product = cosine). Two images are near
duplicates when their cosine is at least `threshold`. Evaluation images are embedded here with the
same model (read from the scores' info.json), so both sides live in one space.

Order: first every corpus sample within `threshold` of an evaluation image is removed
(`eval_duplicate`); then, walking the rest in (shard, key) order, a sample within `threshold` of
an earlier kept one is removed (`near_duplicate`): one of each group survives, the first.
Samples with no embedding (no image, undecodable, blank caption: see score's status) are kept and
counted; the CLIP-score cut is where they go.

Output folder: the kept samples in shards of the same names, sizes.json, `removed.parquet` (shard,
key, caption, reason, duplicate_of, similarity) and `stats.json`, checked to add up.
Exact search costs O(n²) dot products; past a few million pairs, split the corpus by a coarse clustering first (DataComp's image-based clustering).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch
from PIL import Image

from data_prep.curate.cut import write_selection
from data_prep.curate.score import SCORES_DIR, embeddings_of, load_model, read_scores
from data_prep.curate.shardio import check_output_folder, image_of, iter_samples, shard_names
from data_prep.shards import IMAGE_EXTENSIONS, write_json_atomic

QUERY_ROWS = 16_384  # range_search results for this many queries at a time: bounded memory


def eval_image_files(path: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in a folder (recursively), image files and images inside .tar shards."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such evaluation image folder")
    found = []
    for file in sorted(path.rglob("*")):
        suffix = file.suffix.lower().lstrip(".")
        if suffix in IMAGE_EXTENSIONS:
            found.append((str(file.relative_to(path)), file.read_bytes()))
        elif suffix == "tar":
            found += [
                (f"{file.relative_to(path)}:{key}", image)
                for key, files in iter_samples(file)
                if (image := image_of(files)) is not None
            ]
    if not found:
        raise FileNotFoundError(f"{path}: no images (jpg, png, webp, or inside .tar shards) to compare against")
    return found


@torch.no_grad()
def embed_images(
    images: list[bytes], model: str, pretrained: str | None, device: str | None, batch_size: int = 256
) -> np.ndarray:
    clip, preprocess, _, device_used = load_model(model, pretrained, device)
    out = []
    for start in range(0, len(images), batch_size):
        batch = [preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[start : start + batch_size]]
        features = clip.encode_image(torch.stack(batch).to(device_used)).float()
        out.append(torch.nn.functional.normalize(features, dim=-1).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def first_of_each_group(embeddings: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(duplicate_of, similarity): for each row, -1 if kept, else the earlier kept row it nearly copies."""
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(embeddings)
    duplicate_of = np.full(len(embeddings), -1, dtype=np.int64)
    similarity = np.full(len(embeddings), np.nan, dtype=np.float32)
    for start in range(0, len(embeddings), QUERY_ROWS):
        # range_search keeps inner products > radius; nudge it below, so "at least threshold" holds
        lims, scores, ids = index.range_search(
            embeddings[start : start + QUERY_ROWS], np.nextafter(np.float32(threshold), -1)
        )
        for offset in range(len(lims) - 1):
            row = start + offset
            hits, sims = ids[lims[offset] : lims[offset + 1]], scores[lims[offset] : lims[offset + 1]]
            earlier = (hits < row) & (duplicate_of[np.minimum(hits, row)] == -1)  # earlier rows are decided
            if earlier.any():
                best = np.argmax(np.where(earlier, sims, -np.inf))
                duplicate_of[row], similarity[row] = hits[best], sims[best]
    return duplicate_of, similarity


def dedup_shards(
    shards_dir: str | Path,
    output_dir: str | Path,
    threshold: float = 0.95,
    eval_images: str | Path | None = None,
    scores_dir: str | Path | None = None,
    device: str | None = None,
    overwrite: bool = False,
) -> dict:
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold is a cosine similarity in (0, 1], got {threshold}")
    shards_dir, output = Path(shards_dir), Path(output_dir)
    check_output_folder(shards_dir, output, overwrite, "an earlier run")
    names = shard_names(shards_dir)
    scores_dir = Path(scores_dir) if scores_dir else shards_dir / SCORES_DIR
    scores = read_scores(scores_dir, names, shards_dir)  # only samples still in the shards (a cut's output)
    eval_files = eval_image_files(Path(eval_images)) if eval_images is not None else []

    embedded = scores["image_embedding"].notna().to_numpy()
    rows = np.flatnonzero(embedded)
    vectors = embeddings_of(scores[embedded])
    reason = np.full(len(scores), None, dtype=object)
    duplicate_of = np.full(len(scores), None, dtype=object)
    similarity = np.full(len(scores), np.nan, dtype=np.float32)

    if eval_files:
        info = json.loads((scores_dir / "info.json").read_text())
        eval_vectors = embed_images([b for _, b in eval_files], info["model"], info["pretrained"], device)
        index = faiss.IndexFlatIP(eval_vectors.shape[1])
        index.add(eval_vectors)
        best, which = index.search(vectors, 1)
        hit = best[:, 0] >= threshold
        reason[rows[hit]] = "eval_duplicate"
        duplicate_of[rows[hit]] = [eval_files[i][0] for i in which[hit, 0]]
        similarity[rows[hit]] = best[hit, 0]
        rows, vectors = rows[~hit], vectors[~hit]

    first, sims = first_of_each_group(vectors, threshold)
    copies = first >= 0
    reason[rows[copies]] = "near_duplicate"
    duplicate_of[rows[copies]] = scores["key"].to_numpy()[rows[first[copies]]]
    similarity[rows[copies]] = sims[copies]

    kept = pd.isna(reason)
    output.mkdir(parents=True, exist_ok=True)
    sizes = write_selection(shards_dir, output, names, scores[kept])
    removed = scores.loc[~kept, ["shard", "key", "caption"]].assign(
        reason=reason[~kept], duplicate_of=duplicate_of[~kept], similarity=similarity[~kept]
    )
    removed.to_parquet(output / "removed.parquet", index=False)
    stats = {
        "input": {
            "shards": str(shards_dir),
            "samples": len(scores),
            "embedded": int(embedded.sum()),
            "eval_images": len(eval_files),
        },
        "threshold": threshold,
        "kept": int(kept.sum()),
        "kept_without_embedding": int((kept & ~embedded).sum()),
        "removed": int((~kept).sum()),
        "removed_by_reason": {r: int((removed["reason"] == r).sum()) for r in ("eval_duplicate", "near_duplicate")},
        "samples_in_shards": sum(sizes.values()),
    }
    if (
        stats["kept"] + stats["removed"] != len(scores)
        or sum(stats["removed_by_reason"].values()) != stats["removed"]
        or stats["samples_in_shards"] != stats["kept"]
    ):
        raise AssertionError(f"dedup counts do not add up: {stats}")
    write_json_atomic(output / "stats.json", stats)
    return stats
