"""Near-duplicate removal on image embeddings (`python -m data_prep.curate dedup`): planted copies
(resized, re-encoded as JPEG) and copies of evaluation images are found, distinct images are not
removed, every removal is listed with its reason and what it duplicates.

    pytest tests/data_prep/test_dedup.py      # ~15 s on 2 cores after the shared digits CLIP (~35 s)
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from data_prep.curate import dedup
from data_prep.curate.__main__ import main as curate_main
from data_prep.shards import samples_in_tar
from tests.support.digits_clip import write_corpus_with_copies

pytestmark = pytest.mark.timeout(400)
# The digits CLIP embeds in 64 dimensions trained to tell ten digits apart, so two different scans
# of a 7 sit close (nearest other scan: median cosine 0.98, 99.9th percentile 0.9989, measured),
# while a resized JPEG copy stays above 0.9989. A threshold is a property of the model; 0.95 suits
# ViT-B-sized embeddings, this model needs 0.999.
THRESHOLD = 0.999


@pytest.mark.slow  # ~17 s, plus the shared digits CLIP (~35 s) when it runs first
def test_planted_copies_and_eval_copies_are_found_and_distinct_images_kept(digits_clip, tmp_path):
    shards, eval_dir, out = tmp_path / "shards", tmp_path / "eval", tmp_path / "deduped"
    copies_of, eval_of = write_corpus_with_copies(shards, eval_dir)
    assert curate_main(["score", "--shards", str(shards), "--model", digits_clip]) == 0
    assert (
        curate_main(
            [
                "dedup",
                "--shards",
                str(shards),
                "--output",
                str(out),
                "--threshold",
                str(THRESHOLD),
                "--eval-images",
                str(eval_dir),
            ]
        )
        == 0
    )
    stats = json.loads((out / "stats.json").read_text())
    removed = pd.read_parquet(out / "removed.parquet").set_index("key")
    kept = {k for tar in out.glob("*.tar") for k in samples_in_tar(tar)}
    all_keys = {k for tar in shards.glob("*.tar") for k in samples_in_tar(tar)}
    assert kept | set(removed.index) == all_keys and not kept & set(removed.index)

    # Evaluation images: the corpus's copy of each is removed, naming the evaluation file
    eval_found = [
        k
        for k, name in eval_of.items()
        if k in removed.index
        and removed.loc[k, "reason"] == "eval_duplicate"
        and removed.loc[k, "duplicate_of"] == name
    ]
    # Planted copies (of images not in the evaluation set): one of the pair goes, pointing at the other
    pairs = {c: o for c, o in copies_of.items() if o not in eval_of}
    found = [
        c
        for c, o in pairs.items()
        if (c in removed.index) != (o in removed.index)
        and (removed.loc[c, "duplicate_of"] == o if c in removed.index else removed.loc[o, "duplicate_of"] == c)
    ]
    planted = set(eval_of) | set(pairs) | set(pairs.values()) | {c for c, o in copies_of.items() if o in eval_of}
    innocent = all_keys - planted
    false = set(removed.index) & innocent
    print(
        f"eval copies found {len(eval_found)}/{len(eval_of)}, planted copies found {len(found)}/{len(pairs)}, "
        f"false removals {len(false)}/{len(innocent)}"
    )
    assert len(eval_found) >= 0.95 * len(eval_of)
    assert len(found) >= 0.95 * len(pairs)
    assert len(false) <= 0.01 * len(innocent)

    assert stats["removed"] == len(removed) and stats["kept"] == len(kept) == stats["samples_in_shards"]
    assert (
        stats["removed_by_reason"]
        == removed["reason"].value_counts().reindex(["eval_duplicate", "near_duplicate"], fill_value=0).to_dict()
    )
    assert stats["input"]["eval_images"] == len(eval_of)
    assert (removed["similarity"] >= THRESHOLD).all()


def test_the_greedy_walk_keeps_the_first_of_each_group():
    # rows 0, 2, 3 are one picture (3 slightly changed), row 1 another, row 4 a third
    base = np.eye(4, dtype=np.float32)
    vectors = np.stack([base[0], base[1], base[0], base[0] * 0.9999 + base[2] * 0.0141, base[2]])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    duplicate_of, similarity = dedup.first_of_each_group(vectors, 0.999)
    assert duplicate_of.tolist() == [-1, -1, 0, 0, -1]
    assert similarity[2] == pytest.approx(1.0) and np.isnan(similarity[[0, 1, 4]]).all()


def test_bad_dedup_requests_are_refused(tmp_path):
    (tmp_path / "shards").mkdir()
    with pytest.raises(ValueError, match=r"cosine similarity in \(0, 1\]"):
        dedup.dedup_shards(tmp_path / "shards", tmp_path / "out", threshold=1.5)
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        dedup.dedup_shards(tmp_path / "shards", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no images"):
        dedup.eval_image_files(tmp_path / "shards")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # ~4 s, but ~40 s when it is the first to ask for the shared digits CLIP
def test_dedup_runs_on_a_cuts_output_with_the_original_scores(digits_clip, tmp_path):
    shards = tmp_path / "shards"
    write_corpus_with_copies(shards, tmp_path / "eval", copies=20, eval_images=3, originals=300)
    assert curate_main(["score", "--shards", str(shards), "--model", digits_clip]) == 0
    assert (
        curate_main(["filter", "--shards", str(shards), "--output", str(tmp_path / "cut"), "--keep-fraction", "0.5"])
        == 0
    )
    cut_stats = json.loads((tmp_path / "cut" / "stats.json").read_text())
    stats = dedup.dedup_shards(
        tmp_path / "cut", tmp_path / "deduped", threshold=THRESHOLD, scores_dir=shards / "_scores"
    )
    assert stats["input"]["samples"] == cut_stats["kept"]  # the cut's removals are not counted again
    assert stats["kept"] + stats["removed"] == cut_stats["kept"]
