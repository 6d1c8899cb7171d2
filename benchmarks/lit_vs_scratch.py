"""LiT vs training from scratch on the demo digits: steps to 90 % zero-shot top-1.

    python -m benchmarks.lit_vs_scratch --root /tmp/lit          # corpus, scratch run, LiT run, table
    python -m benchmarks.lit_vs_scratch --root /tmp/lit --eval-every 25 --steps 500

1. the demo corpus (``python -m data_prep.demo``), unless ROOT/demo_out/corpus exists;
2. ``experiment=demo`` from scratch (run ``scratch``), zero-shot every ``--eval-every`` steps;
3. a LiT start: the scratch run's image tower, a freshly initialised text tower and temperature
   (seed 0), saved as an open_clip state dict (ROOT/lit_init.pt);
4. ``experiment=lit_demo model.init_checkpoint=ROOT/lit_init.pt`` (run ``lit``): image tower locked;
5. the first evaluated step at which each run reaches ``--target`` top-1, and the curves, printed as
   a markdown table and written to ROOT/lit_vs_scratch.json. It reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def run(command: list[str], cwd: Path) -> float:
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True)
    return time.perf_counter() - start


def curve(run_dir: Path) -> list[tuple[int, float]]:
    points = {}
    with open(run_dir / "csv" / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            value = row.get("eval/demo_digits/top1")
            if value:
                points[int(float(row["step"]))] = float(value)
    return sorted(points.items())


def lit_init(scratch_ckpt: Path, out: Path) -> None:
    """The scratch run's image tower with a fresh text tower and temperature: an open_clip state dict."""
    from clip_pl.interchange import read_clip_pl_checkpoint
    from clip_pl.model import build_clip

    checkpoint = read_clip_pl_checkpoint(scratch_ckpt)
    torch.manual_seed(0)
    fresh = build_clip(checkpoint.model_config).state_dict()
    state = {k: (v if k.startswith("visual.") else fresh[k]) for k, v in checkpoint.state_dict.items()}
    torch.save(state, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--target", type=float, default=0.90)
    args = parser.parse_args()
    root, python = args.root.resolve(), sys.executable
    repo = Path(__file__).resolve().parents[1]
    corpus = root / "demo_out" / "corpus"
    seconds = {}
    if not (corpus / "shards").exists():
        seconds["corpus"] = run([python, "-m", "data_prep.demo", "--out", str(corpus)], repo)
    common = [
        f"paths.root_dir={root}",
        f"paths.demo_dir={corpus}",
        f"trainer.max_steps={args.steps}",
        f"eval.callbacks.demo_digits.every_n_steps={args.eval_every}",
        "callbacks.telemetry.heatmap_every_n_steps=0",
    ]
    seconds["scratch"] = run([python, "-m", "clip_pl.train", "experiment=demo", "run_name=scratch", *common], repo)
    init = root / "lit_init.pt"
    lit_init(root / "runs" / "scratch" / "checkpoints" / "last.ckpt", init)
    seconds["lit"] = run(
        [
            python,
            "-m",
            "clip_pl.train",
            "experiment=lit_demo",
            "run_name=lit",
            "resume=none",
            f"model.init_checkpoint={init}",
            *common,
        ],
        repo,
    )
    results = {}
    for name in ("scratch", "lit"):
        points = curve(root / "runs" / name)
        reached = next((step for step, top1 in points if top1 >= args.target), None)
        results[name] = {
            "curve": points,
            "steps_to_target": reached,
            "final_top1": points[-1][1] if points else None,
            "train_seconds": seconds[name],
        }
    results["target"] = args.target
    (root / "lit_vs_scratch.json").write_text(json.dumps(results, indent=2))
    print(f"\n| run | steps to {args.target:.0%} top-1 | final top-1 | wall (train + evals) |\n|---|---|---|---|")
    for name in ("scratch", "lit"):
        r = results[name]
        print(f"| {name} | {r['steps_to_target']} | {r['final_top1']:.1%} | {r['train_seconds']:.0f} s |")
    print("\ncurves (step: top-1):")
    for name in ("scratch", "lit"):
        print(name, ", ".join(f"{s}: {v:.1%}" for s, v in results[name]["curve"]))


if __name__ == "__main__":
    main()
