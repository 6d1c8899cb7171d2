"""The shipped demo tasks: drawn, listed, and every one of them evaluates (digits stand-in: a small folder).

pytest tests/eval/test_demo_tasks.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from clip_pl.eval.demo_tasks import classes
from clip_pl.eval.suite import evaluate_tasks, suite_average
from clip_pl.eval.tasks import load_task_list
from tests.support.eval import random_images, tiny_model, write_imagefolder

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_tasks_are_drawn_listed_and_all_evaluate(tmp_path):
    digits = write_imagefolder(tmp_path / "corpus" / "test", random_images(20, seed=4), [i % 10 for i in range(20)])
    (digits / "classnames.txt").write_text("\n".join(str(i) for i in range(10)) + "\n")
    (digits / "templates.txt").write_text("a handwritten {}\nthe digit {}\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_pl.eval.demo_tasks",
            "--out",
            str(tmp_path / "tasks"),
            "--digits",
            str(digits),
            "--per-class",
            "3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    tasks = load_task_list(tmp_path / "tasks" / "tasks.yaml")
    assert [(t.name, t.type) for t in tasks] == [
        ("digits", "zeroshot_classification"),
        ("shapes", "zeroshot_classification"),
        ("shape_captions", "retrieval"),
        ("shapes_probe", "linear_probe"),
    ]
    assert tasks[1].classnames == tuple(sorted(f"{c} {s}" for c, s in classes()))
    model, config = tiny_model(seed=1)
    results = evaluate_tasks(model, config, tasks, batch_size=16)
    assert results["digits"]["samples"] == 20 and results["shapes"]["samples"] == 12 * 3
    assert results["shape_captions"]["images"] == 12 and results["shape_captions"]["captions"] == 24
    assert results["shapes_probe"]["test_samples"] == 36 and results["shapes_probe"]["train_samples"] == 72
    assert 0 <= suite_average(results, tasks) <= 1
    # Drawn the same way every time: a second run writes identical files.
    again = subprocess.run(
        [sys.executable, "-m", "clip_pl.eval.demo_tasks", "--out", str(tmp_path / "again"), "--per-class", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0 and "digits" not in (tmp_path / "again" / "tasks.yaml").read_text()
    for path in (tmp_path / "again").rglob("*.png"):
        assert path.read_bytes() == (tmp_path / "tasks" / path.relative_to(tmp_path / "again")).read_bytes()
