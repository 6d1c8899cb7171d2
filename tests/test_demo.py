"""`make demo` end to end at reduced size: corpus from the local web server, training, zero-shot
on the held-out digits, curves and summary. It must learn: zero-shot clearly above chance."""

from __future__ import annotations

import json

import pytest

from clip_pl.demo import main as run_demo


@pytest.mark.slow  # ~150 s alone on 2 cores, ~4-9 min beside the rest of the suite: corpus, 150 steps, evaluation, curation
@pytest.mark.timeout(1500)  # not the 600 s default: a busy machine must not fail it
def test_the_demo_pipeline_learns_and_reports(tmp_path, capsys):
    root = tmp_path / "not" / "made" / "yet"  # --root is created when missing
    summary = run_demo(
        [
            "--root",
            str(root),
            "--steps",
            "150",
            "trainer.log_every_n_steps=5",
            "eval.callbacks.demo_digits.every_n_steps=75",
            "callbacks.telemetry.heatmap_every_n_steps=75",
        ]
    )
    assert summary["zero_shot_top1"] >= 0.3, summary  # chance is 0.1 on ten digits
    assert summary["held_out_images"] == 360
    assert summary["optimizer_steps"] == 150 and summary["samples_seen"] == 150 * 64
    assert summary["download"]["failures_by_reason"]["http_404"] > 0  # the injected faults were met
    assert summary["throughput_samples_per_s_median"] > 0
    run_dir = root / "runs" / "demo"
    assert json.loads((run_dir / "demo_summary.json").read_text()) == summary
    assert (run_dir / "plots" / "curves.png").stat().st_size > 10_000
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in (run_dir / "plots").glob("similarity_step*.png")) == [
        "similarity_step0000075.png",
        "similarity_step0000150.png",
    ]
    assert summary["paths"]["wandb_offline_run"] and "offline-run" in summary["paths"]["wandb_offline_run"]
    printed = capsys.readouterr().out
    assert "zero-shot" in printed and "wandb sync" in printed
    assert printed.rstrip().splitlines()[-1].startswith("average of the 4 main metrics (*), DataComp-style")
    assert {"digits/acc1", "shapes/acc1", "shape_captions/mean_recall@1", "shapes_probe/lp_acc1"} <= set(
        summary["suite"]
    )
    # stage 4, curation: the URL table balanced (the head entry "one" cut towards t), every stored pair
    # scored by the trained model and the 90 % cut; each count adds up and the cut separates scores
    balance, cut = summary["curation"]["balance"], summary["curation"]["clip_score_cut"]
    assert balance["rows"] == summary["download"]["urls"]
    assert balance["kept"] + sum(balance["removed_by_reason"].values()) == balance["rows"]
    assert (
        balance["top_entry"]["before"] > balance["threshold"]
        and balance["top_entry"]["after"] < balance["top_entry"]["before"]
    )
    assert cut["scored"] == summary["download"]["stored"]
    assert cut["kept"] == round(0.9 * cut["scored"]) or abs(cut["kept"] - 0.9 * cut["scored"]) <= 1
    assert cut["kept"] + sum(cut["removed_by_reason"].values()) == cut["scored"]
    assert cut["median_score_kept"] > cut["median_score_removed"]
    assert "balancing" in printed and "CLIP-score cut" in printed
