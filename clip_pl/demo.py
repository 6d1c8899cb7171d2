"""The whole pipeline on the bundled digits, on a laptop: `make demo` runs this.

    python -m clip_pl.demo                         # corpus → shards → train → zero-shot → summary
    python -m clip_pl.demo --steps 150 --root /tmp/demo trainer.log_every_n_steps=5

Each stage is the command a user would type, run as a subprocess, so the demo exercises exactly
the public entry points:
  1. python -m data_prep.demo --out ROOT/demo_out/corpus        local HTTP server → img2dataset
  2. python -m clip_pl.train experiment=demo …                  tiny CLIP, zero-shot every 100 steps
  3. python -m clip_pl.eval.demo_tasks --out ROOT/demo_out/tasks …   draws the shape tasks, lists the suite
     python -m clip_pl.eval checkpoint=…/last.ckpt eval=suite eval.task_list=…/tasks.yaml
                                                                held-out digits, shapes, captions, a linear probe
  4. python -m data_prep.curate balance …                      MetaCLIP-style balancing of the URL table
     python -m clip_pl.interchange export …/last.ckpt …         the trained model as an open_clip folder
     python -m data_prep.curate score / filter …               CLIP score of every pair, a 90 % cut
then plots the curves and prints a summary (also written to ROOT/runs/demo/demo_summary.json), ending
with the suite's table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from clip_pl.plots import plot_training_curves, read_series


def run_stage(title: str, command: list[str], cwd: Path) -> float:
    print(f"\n=== {title}\n$ {' '.join(command)}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True)
    return time.perf_counter() - start


# The demo's metadata entries for balancing: every digit as a numeral and as a word (its captions
# name the digit one way or the other). MetaCLIP's t is 20 000 at 400 M pairs; 200 here makes the
# head entry of this ~2 900-row table ("one": "someone" matches it too) visibly balanced.
DIGIT_ENTRIES = [str(d) for d in range(10)] + [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
]
BALANCE_THRESHOLD = 200
KEEP_FRACTION = 0.9


def curate(python: str, corpus: Path, run_dir: Path, cwd: Path) -> float:
    """Stage 4: the curation a web corpus gets, on the demo's: balancing, then a CLIP-score cut by the
    model just trained. Outputs go under the run (RUN/curation), which a new demo run replaces."""
    out = run_dir / "curation"
    out.mkdir(parents=True, exist_ok=True)
    entries = out / "entries.txt"
    entries.write_text("\n".join(DIGIT_ENTRIES) + "\n")
    seconds = run_stage(
        "4/4 curation: MetaCLIP-style balancing of the URL table",
        [
            python,
            "-m",
            "data_prep.curate",
            "balance",
            "--input",
            str(corpus / "urls.parquet"),
            "--metadata",
            str(entries),
            "--output",
            str(out / "balanced"),
            "--threshold",
            str(BALANCE_THRESHOLD),
            "--ignore-case",
        ],
        cwd,
    )
    seconds += run_stage(
        "4/4 curation: CLIP score of every pair by the trained model, a 90 % cut",
        [
            python,
            "-m",
            "clip_pl.interchange",
            "export",
            str(run_dir / "checkpoints" / "last.ckpt"),
            str(out / "open_clip"),
        ],
        cwd,
    )
    seconds += run_stage(
        "4/4 curation: scoring",
        [
            python,
            "-m",
            "data_prep.curate",
            "score",
            "--shards",
            str(corpus / "shards"),
            "--model",
            f"local-dir:{out / 'open_clip'}",
            "--scores",
            str(out / "scores"),
            "--device",
            "cpu",
        ],
        cwd,
    )
    seconds += run_stage(
        "4/4 curation: the cut",
        [
            python,
            "-m",
            "data_prep.curate",
            "filter",
            "--shards",
            str(corpus / "shards"),
            "--scores",
            str(out / "scores"),
            "--keep-fraction",
            str(KEEP_FRACTION),
            "--output",
            str(out / "filtered"),
        ],
        cwd,
    )
    return seconds


def curation_summary(out: Path) -> dict:
    balance = json.loads((out / "balanced" / "stats.json").read_text())
    cut = json.loads((out / "filtered" / "stats.json").read_text())
    return {
        "balance": {
            "rows": balance["input"]["rows"],
            "kept": balance["pairs"]["kept"],
            "removed_by_reason": balance["removed_by_reason"],
            "threshold": BALANCE_THRESHOLD,
            "top_entry": balance["top_entries"][0],
        },
        "clip_score_cut": {
            "scored": cut["input"]["scored"],
            "kept": cut["kept"],
            "removed_by_reason": cut["removed_by_reason"],
            "keep_fraction": KEEP_FRACTION,
            "median_score_kept": cut["scores_kept"]["p50"],
            "median_score_removed": cut["scores_removed"]["p50"],
        },
    }


def summarize(run_dir: Path, corpus: Path, eval_json: Path, stage_seconds: dict) -> dict:
    series = read_series(run_dir / "csv" / "metrics.csv")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    end = events[-1]
    throughput = [v for step, v in series.get("perf/samples_per_s", []) if step > 0]
    bad = {k.split("/", 2)[2]: int(v[-1][1]) for k, v in series.items() if k.startswith("data/bad_samples/")}
    manifest = json.loads((corpus / "manifest.json").read_text())
    stats = manifest["stats"]
    suite = json.loads(eval_json.read_text())["results"]["suite"]
    results = {"top1": suite["digits/acc1"], "top5": suite["digits/acc5"], "samples": suite["digits/samples"]}
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*")) if (run_dir / "wandb").is_dir() else []
    return {
        "samples_seen": end["global_step"] * end["global_batch_size"],
        "optimizer_steps": end["global_step"],
        "throughput_samples_per_s_median": statistics.median(throughput) if throughput else None,
        "download": {
            "urls": stats["input"]["rows"],
            "stored": stats["samples_in_shards"],
            "success_rate": stats["success_rate"],
            "failures_by_reason": stats["download"]["failures_by_reason"],
        },
        "skipped_or_converted_samples": bad,
        "zero_shot_top1": results["top1"],
        "zero_shot_top5": results["top5"],
        "held_out_images": results.get("samples"),
        "suite": suite,
        "curation": curation_summary(run_dir / "curation"),
        "seconds": stage_seconds,
        "paths": {
            "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
            "metrics": str(run_dir / "csv" / "metrics.csv"),
            "curves": str(run_dir / "plots" / "curves.png"),
            "similarity_heatmaps": str(run_dir / "plots"),
            "eval_json": str(eval_json),
            "task_list": str(corpus.parent / "tasks" / "tasks.yaml"),
            "curation": str(run_dir / "curation"),
            "wandb_offline_run": str(wandb_runs[-1]) if wandb_runs else None,
        },
    }


def print_summary(summary: dict) -> None:
    d = summary["download"]
    print("\n=== clip_pl demo summary")
    print(
        f"download             {d['urls']} URLs, {d['stored']} samples stored, success rate {100 * d['success_rate']:.1f} %; "
        f"failures by reason: {d['failures_by_reason']}"
    )
    print(
        f"training             {summary['samples_seen']} samples seen in {summary['optimizer_steps']} steps, "
        f"median {summary['throughput_samples_per_s_median']:.0f} samples/s"
    )
    print(f"bad samples          {summary['skipped_or_converted_samples'] or 'none'}")
    print(
        f"zero-shot            top-1 {100 * summary['zero_shot_top1']:.1f} %, top-5 {100 * summary['zero_shot_top5']:.1f} % "
        f"on {summary['held_out_images']} held-out digits (chance: 10 %)"
    )
    b, c = summary["curation"]["balance"], summary["curation"]["clip_score_cut"]
    print(
        f"balancing            {b['rows']} URL rows, {b['kept']} kept at t={b['threshold']}; removed by reason: "
        f"{b['removed_by_reason']}; top entry {b['top_entry']['entry']!r}: {b['top_entry']['before']} -> "
        f"{b['top_entry']['after']}"
    )
    print(
        f"CLIP-score cut       {c['scored']} pairs scored, {c['kept']} kept ({100 * c['keep_fraction']:.0f} %); median "
        f"score kept {c['median_score_kept']:.3f}, removed {c['median_score_removed']:.3f}"
    )
    for name, path in summary["paths"].items():
        print(f"{name:<21}{path}")
    if summary["paths"]["wandb_offline_run"]:
        print(f"W&B                  offline run; upload it with: wandb sync {summary['paths']['wandb_offline_run']}")
    from clip_pl.eval.report import format_suite_table
    from clip_pl.eval.tasks import load_task_list

    tasks = load_task_list(summary["paths"]["task_list"])
    print("\n=== evaluation suite (python -m clip_pl.eval … eval=suite)")
    print(format_suite_table(summary["suite"], [(t.name, t.type, t.main_metric) for t in tasks]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="where demo_out/ and runs/ go (default: here)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: experiment=demo's)")
    parser.add_argument("--copies", type=int, default=2, help="captioned URLs per training digit")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for training")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)  # the stages run with it as their working directory
    corpus, run_dir = root / "demo_out" / "corpus", root / "runs" / "demo"
    python = sys.executable
    seconds = {
        "corpus": run_stage(
            "1/4 demo corpus: local web server → img2dataset → shards",
            [python, "-m", "data_prep.demo", "--out", str(corpus), "--copies", str(args.copies)],
            root,
        )
    }
    if run_dir.exists():  # experiment=demo trains from scratch: the previous demo run goes
        print(f"removing the previous demo run {run_dir}")
        shutil.rmtree(run_dir)
    train = [python, "-m", "clip_pl.train", "experiment=demo", f"paths.root_dir={root}", f"paths.demo_dir={corpus}"]
    if args.steps:
        train.append(f"trainer.max_steps={args.steps}")
    seconds["train"] = run_stage(
        "2/4 training the tiny CLIP (zero-shot on held-out digits every 100 steps)", train + args.overrides, root
    )
    eval_json, tasks = run_dir / "eval_suite.json", root / "demo_out" / "tasks"
    seconds["eval"] = run_stage(
        "3/4 the evaluation suite on the final checkpoint: drawing its tasks",
        [python, "-m", "clip_pl.eval.demo_tasks", "--out", str(tasks), "--digits", str(corpus / "test")],
        root,
    )
    seconds["eval"] += run_stage(
        "3/4 the evaluation suite: digits, shapes, shape captions, a linear probe",
        [
            python,
            "-m",
            "clip_pl.eval",
            f"checkpoint={run_dir / 'checkpoints' / 'last.ckpt'}",
            "eval=suite",
            f"eval.task_list={tasks / 'tasks.yaml'}",
            f"output_json={eval_json}",
        ],
        root,
    )
    seconds["curation"] = curate(python, corpus, run_dir, root)
    plot_training_curves(run_dir / "csv" / "metrics.csv", run_dir / "plots" / "curves.png")
    summary = summarize(run_dir, corpus, eval_json, seconds)
    (run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
