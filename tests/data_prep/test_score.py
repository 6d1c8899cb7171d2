"""CLIP-score curation (`python -m data_prep.curate score` / `filter`) with a CLIP trained on the
demo's digits (tests/support/digits_clip.py): on shards where 20 % of the captions name the wrong
digit, a keep-fraction-0.7 cut removes the mismatched pairs and keeps true ones; scores are written
beside the shards and reused by later cuts; every removal is counted by reason and listed.

    pytest tests/data_prep/test_score.py      # ~50 s on 2 cores, most of it training the scorer once
"""

from __future__ import annotations

import json
import tarfile

import pandas as pd
import pytest
import torch

from data_prep.curate import cut, score
from data_prep.curate.__main__ import main as curate_main
from data_prep.shards import samples_in_tar
from tests.support.digits_clip import write_mismatched_corpus

# slow: the first test to run pays the shared digits CLIP's training (~35 s on 2 cores)
pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, digits_clip):
    """(model name, shards folder, {key: mismatched}) with the shards scored once through the CLI."""
    root, model = tmp_path_factory.mktemp("score"), digits_clip
    truth = write_mismatched_corpus(root / "shards")
    assert curate_main(["score", "--shards", str(root / "shards"), "--model", model, "--batch-size", "100"]) == 0
    return model, root / "shards", truth


def test_a_fraction_cut_removes_mismatched_captions_and_keeps_true_pairs(scored, tmp_path):
    model, shards, truth = scored
    assert (
        curate_main(["filter", "--shards", str(shards), "--output", str(tmp_path / "cut"), "--keep-fraction", "0.7"])
        == 0
    )
    stats = json.loads((tmp_path / "cut" / "stats.json").read_text())
    kept = {key for tar in sorted((tmp_path / "cut").glob("*.tar")) for key in samples_in_tar(tar)}
    mismatched = {k for k, wrong in truth.items() if wrong}
    true_pairs = set(truth) - mismatched
    assert 0.15 < len(mismatched) / len(truth) < 0.25
    removed_share = 1 - len(kept & mismatched) / len(mismatched)
    true_kept = len(kept & true_pairs) / len(true_pairs)
    print(
        f"mismatched removed {removed_share:.3f}, true kept {true_kept:.3f}, kept pairs true {len(kept & true_pairs) / len(kept):.3f}"
    )
    assert removed_share >= 0.90
    # Keeping 70 % of the pairs when 80 % are true must drop ≥ 12.5 % of the true ones (at best 0.875
    # are kept): the "keeps ≥ 95 % of the true pairs" is asked of that best, and of the kept set's purity.
    assert true_kept >= 0.95 * 0.875 and len(kept & true_pairs) / len(kept) >= 0.95

    # The report adds up and lists every removal with its reason
    removed = pd.read_parquet(tmp_path / "cut" / "removed.parquet")
    assert stats["input"]["samples"] == len(truth) + 2 and stats["input"]["scored"] == len(truth)
    assert stats["kept"] == len(kept) == sum(json.loads((tmp_path / "cut" / "sizes.json").read_text()).values())
    assert set(removed["key"]) | kept == set(truth) | {"broken01", "blank001"} and not set(removed["key"]) & kept
    assert removed.set_index("key").loc[["broken01", "blank001"], "reason"].tolist() == [
        "undecodable_image",
        "missing_caption",
    ]
    assert stats["removed_by_reason"] == {
        "low_clip_score": len(truth) - len(kept),
        "no_image": 0,
        "undecodable_image": 1,
        "missing_caption": 1,
    }
    # A kept sample is whole: image, caption and metadata all copied
    with tarfile.open(tmp_path / "cut" / "00000.tar") as tar:
        names = tar.getnames()
    key = sorted(k for k in kept if k in {n.split(".")[0] for n in names})[0]
    assert {f"{key}.png", f"{key}.txt", f"{key}.json"} <= set(names)


def test_a_threshold_cut_reuses_the_scores_and_keeps_exactly_those_above_it(scored, tmp_path):
    model, shards, truth = scored
    files = sorted((shards / score.SCORES_DIR).glob("*.parquet"))
    stamps = [f.stat().st_mtime_ns for f in files]
    scores = pd.concat([pd.read_parquet(f) for f in files])
    assert len(files) == 3 and scores["status"].value_counts()["scored"] == len(truth)
    assert scores.loc[scores["status"] == "scored", "image_embedding"].map(len).eq(64).all()
    threshold = float(scores["clip_score"].median())
    stats = cut.filter_shards(shards, tmp_path / "cut", min_score=threshold)
    expected = set(scores.loc[scores["clip_score"] >= threshold, "key"])
    assert {k for tar in (tmp_path / "cut").glob("*.tar") for k in samples_in_tar(tar)} == expected
    assert stats["kept"] == len(expected) and stats["cut"]["threshold"] == round(threshold, 6)
    # Scoring again scores nothing (resume); the scores on disk are untouched
    info = score.score_shards(shards, model)
    assert info["shards_scored_this_run"] == 0 and [f.stat().st_mtime_ns for f in files] == stamps
    # The same output folder again is refused without --overwrite
    with pytest.raises(FileExistsError, match="--overwrite"):
        cut.filter_shards(shards, tmp_path / "cut", min_score=threshold)


def test_bad_scoring_and_cut_requests_are_refused_before_work(scored, tmp_path, capsys):
    model, shards, _ = scored
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        score.score_shards(tmp_path / "empty", model)
    with pytest.raises(FileExistsError, match="holds scores by"):
        score.score_shards(shards, "ViT-B-32", pretrained=str(shards / "00000.tar"))
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        score.load_model(f"local-dir:{tmp_path}")
    with pytest.raises(ValueError, match="random weights"):
        score.load_model("ViT-B-32")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        score.load_model("ViT-B-32", pretrained=str(tmp_path / "none.bin"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            score.load_model(model, device="cuda")
    with pytest.raises(ValueError, match="exactly one of"):
        cut.filter_shards(shards, tmp_path / "o", keep_fraction=0.5, min_score=0.1)
    with pytest.raises(ValueError, match=r"keep_fraction must be in \(0, 1\]"):
        cut.filter_shards(shards, tmp_path / "o", keep_fraction=1.5)
    with pytest.raises(ValueError, match="must differ"):
        cut.filter_shards(shards, shards, keep_fraction=0.5)
    with pytest.raises(FileNotFoundError, match="run `python -m data_prep.curate score` first"):
        cut.filter_shards(shards, tmp_path / "o", keep_fraction=0.5, scores_dir=tmp_path / "empty")
    assert not (tmp_path / "o").exists()
    assert (
        curate_main(
            ["filter", "--shards", str(tmp_path / "empty"), "--output", str(tmp_path / "o"), "--min-score", "0.2"]
        )
        == 2
    )
    assert "no .tar shards" in capsys.readouterr().err


def test_the_curation_benchmark_runs_at_a_small_size(digits_clip, tmp_path):
    from benchmarks.curate_bench import main as bench  # noqa: PLC0415

    result = bench(
        [
            "--rows",
            "3000",
            "--entries",
            "500",
            "--reference-rows",
            "50",
            "--model",
            digits_clip,
            "--copies",
            "1",
            "--json",
            str(tmp_path / "bench.json"),
        ]
    )
    # The speed ratio is reported, not asserted: it depends on the machine's load (benchmarks/RESULTS.md).
    assert result["balance"]["rows"] == 3000 and result["balance"]["ratio"] > 0
    assert result["score"]["images"] == 360 and result["score"]["images_per_second"] > 0
    assert json.loads((tmp_path / "bench.json").read_text()) == result
