"""Cut downloaded shards by CLIP score (DataComp's baselines): keep the top fraction of the scored
pairs or those at or above a threshold, from the scores `data_prep.curate.score` wrote.

Output folder: the kept samples in shards of the same names (sizes.json counted from them),
`removed.parquet` (shard, key, caption, clip_score, reason) and `stats.json` (removed by reason:
`low_clip_score`, `undecodable_image`, `no_image`, `missing_caption`), checked to add up.
The fraction is of the scored pairs, so its cut needs every score at once: a float and two short
strings per pair (about 3 GB at 100 M pairs); past that, pick the threshold from a sample and cut
with `--min-score`, which any number of machines can apply shard by shard.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.curate.score import SCORES_DIR, read_scores
from data_prep.curate.shardio import check_output_folder, copy_samples, shard_names
from data_prep.shards import write_json_atomic, write_sizes

UNSCORED_REASONS = ("no_image", "undecodable_image", "missing_caption")


def write_selection(shards_dir: Path, output: Path, names: list[str], kept: pd.DataFrame) -> dict[str, int]:
    """Shards of the same names in `output` holding the samples listed in `kept` (shard, key); sizes.json."""
    keep_keys = kept.groupby("shard")["key"].agg(set).to_dict()
    for name in names:
        copy_samples(shards_dir / f"{name}.tar", output / f"{name}.tar", keep_keys.get(name, set()))
    return write_sizes(output, names)


def _quantiles(values: pd.Series) -> dict:
    if values.empty:
        return {}
    return {f"p{q}": round(float(np.quantile(values, q / 100)), 4) for q in (5, 25, 50, 75, 95)}


def filter_shards(
    shards_dir: str | Path,
    output_dir: str | Path,
    keep_fraction: float | None = None,
    min_score: float | None = None,
    scores_dir: str | Path | None = None,
    overwrite: bool = False,
) -> dict:
    if (keep_fraction is None) == (min_score is None):
        raise ValueError("give exactly one of keep_fraction (--keep-fraction) and min_score (--min-score)")
    if keep_fraction is not None and not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    shards_dir, output = Path(shards_dir), Path(output_dir)
    check_output_folder(shards_dir, output, overwrite, "an earlier cut")
    names = shard_names(shards_dir)
    scores = read_scores(Path(scores_dir) if scores_dir else shards_dir / SCORES_DIR, names, shards_dir)

    scored = scores["status"] == "scored"
    if keep_fraction is not None:
        # the top ceil(f·n) scored pairs; ties broken by (shard, key) order, so the cut is reproducible
        n_keep = math.ceil(keep_fraction * int(scored.sum()))
        ranked = scores[scored].sort_values(
            ["clip_score", "shard", "key"], ascending=[False, True, True], kind="stable"
        )
        kept = scores.index.isin(ranked.index[:n_keep])
        threshold = float(ranked["clip_score"].iloc[n_keep - 1]) if n_keep else math.inf
    else:
        kept = (scored & (scores["clip_score"] >= min_score)).to_numpy()
        threshold = float(min_score)
    reason = scores["status"].where(~scored, "low_clip_score")

    output.mkdir(parents=True, exist_ok=True)
    sizes = write_selection(shards_dir, output, names, scores[kept])
    removed = scores.loc[~kept, ["shard", "key", "caption", "clip_score"]].assign(reason=reason[~kept])
    removed.to_parquet(output / "removed.parquet", index=False)

    stats = {
        "input": {"shards": str(shards_dir), "samples": len(scores), "scored": int(scored.sum())},
        "cut": {"keep_fraction": keep_fraction, "min_score": min_score, "threshold": round(threshold, 6)},
        "kept": int(kept.sum()),
        "removed": int((~kept).sum()),
        "removed_by_reason": {r: int((removed["reason"] == r).sum()) for r in ("low_clip_score", *UNSCORED_REASONS)},
        "scores_kept": _quantiles(scores.loc[kept, "clip_score"]),
        "scores_removed": _quantiles(removed["clip_score"].dropna()),
        "samples_in_shards": sum(sizes.values()),
    }
    _check_accounting(stats)
    write_json_atomic(output / "stats.json", stats)
    return stats


def _check_accounting(stats: dict) -> None:
    """Raise if any sample is unaccounted for: silent loss is a bug, not a statistic."""
    if stats["kept"] + stats["removed"] != stats["input"]["samples"]:
        raise AssertionError(f"kept + removed != samples: {stats}")
    if sum(stats["removed_by_reason"].values()) != stats["removed"]:
        raise AssertionError(f"removal reasons do not add up: {stats['removed_by_reason']} vs {stats['removed']}")
    if stats["samples_in_shards"] != stats["kept"]:
        raise AssertionError(f"the written shards hold {stats['samples_in_shards']} samples, {stats['kept']} were kept")
