"""What img2dataset left in an output folder, read back: completed shards, per-URL results,
the `sizes.json` manifest counted from the tars themselves, and image-hash deduplication.

img2dataset writes, per shard id: `{id:05d}.tar` (the samples), `{id:05d}.parquet` (one row per
input URL with status / error_message / sha256) and, last, `{id:05d}_stats.json`. A shard is
complete only once its stats file exists; a tar without one is an interrupted shard that the
next incremental run redoes.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path

import pandas as pd

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_STATS_FILE = re.compile(r"^(\d+)_stats\.json$")


def completed_shards(output_dir: Path) -> list[str]:
    """Names ('00000', …) of the shards img2dataset finished, sorted."""
    names = [m.group(1) for p in Path(output_dir).glob("*_stats.json") if (m := _STATS_FILE.match(p.name))]
    return sorted(names)


def shard_results(output_dir: Path, shards: list[str]) -> pd.DataFrame:
    """One row per URL attempted in `shards`: shard, key, url, status, error_message, sha256 (+ extras)."""
    frames = []
    for name in shards:
        frame = pd.read_parquet(Path(output_dir) / f"{name}.parquet")
        frames.append(frame.assign(shard=name))
    if not frames:
        return pd.DataFrame(columns=["shard", "key", "url", "status", "error_message", "sha256"])
    return pd.concat(frames, ignore_index=True).sort_values("key", kind="stable").reset_index(drop=True)


def _sample_key(member_name: str) -> tuple[str, str]:
    # webdataset's convention: the key is everything before the first dot of the base name
    base = os.path.basename(member_name)
    key, _, ext = base.partition(".")
    return key, ext.lower()


def samples_in_tar(tar_path: Path) -> list[str]:
    """Keys of the samples in a tar that carry an image (what a trainer can use)."""
    keys = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            key, ext = _sample_key(member.name)
            if member.isfile() and ext in IMAGE_EXTENSIONS:
                keys.append(key)
    return keys


def write_json_atomic(path: Path, payload) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_sizes(output_dir: Path, shards: list[str]) -> dict[str, int]:
    """sizes.json in OpenCLIP's format ({"00000.tar": n, …}), counted from the tar contents."""
    sizes = {f"{name}.tar": len(samples_in_tar(Path(output_dir) / f"{name}.tar")) for name in shards}
    write_json_atomic(Path(output_dir) / "sizes.json", sizes)
    return sizes


def image_hash_duplicates(results: pd.DataFrame, hash_col: str = "sha256") -> pd.DataFrame:
    """Successful rows whose image bytes repeat an earlier (lower key) success; the first is kept."""
    ok = results[(results["status"] == "success") & results[hash_col].notna()]
    return ok[ok[hash_col].duplicated(keep="first")]


def drop_samples(output_dir: Path, keys_by_shard: dict[str, set[str]]) -> int:
    """Rewrite each tar without the given sample keys (atomic replace); returns members removed.

    Idempotent: keys already gone are simply not found, so an incremental re-run changes nothing.
    """
    removed = 0
    for shard, keys in keys_by_shard.items():
        tar_path = Path(output_dir) / f"{shard}.tar"
        with tarfile.open(tar_path) as src:
            members = src.getmembers()
            doomed = [m for m in members if _sample_key(m.name)[0] in keys]
            if not doomed:
                continue
            tmp = tar_path.with_suffix(".tar.tmp")
            with tarfile.open(tmp, "w") as dst:
                for member in members:
                    if _sample_key(member.name)[0] not in keys:
                        dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        os.replace(tmp, tar_path)
        removed += len(doomed)
    return removed
