"""The standalone evaluator, run as a user runs it: ``python -m clip_pl.eval checkpoint=… eval=…``.

pytest tests/eval/test_cli.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from clip_pl.config_dir import config_dir
from clip_pl.eval.__main__ import run
from tests.support.eval import (
    CLASSNAMES,
    TEMPLATES,
    labels_with_known_accuracy,
    oracle_class_order,
    random_images,
    tiny_checkpoint,
    write_imagefolder,
)

REPO = Path(__file__).resolve().parents[2]


def _run(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "clip_pl.eval", *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # multi-process or subprocess: > ~10 s on 2 cores (make test-quick leaves it out)
def test_demo_digits_evaluation_prints_a_table_and_writes_json(tmp_path):
    checkpoint, model, config = tiny_checkpoint(tmp_path / "run" / "last.ckpt", seed=8)
    images = random_images(12, seed=9)
    labels, top1, top5 = labels_with_known_accuracy(oracle_class_order(model, config, images, CLASSNAMES, TEMPLATES))
    test_dir = write_imagefolder(tmp_path / "demo" / "test", images, labels)
    (test_dir / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (test_dir / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")

    done = _run(
        f"checkpoint={checkpoint}",
        "eval=demo_digits",
        f"paths.demo_dir={tmp_path / 'demo'}",
        "num_workers=0",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "demo_digits" in done.stdout and "top1" in done.stdout and f"{100 * top1:.2f} %" in done.stdout
    written = json.loads((tmp_path / "run" / "last.eval-demo_digits.json").read_text())
    assert written["results"]["demo_digits"]["top1"] == pytest.approx(top1)
    assert written["results"]["demo_digits"]["top5"] == pytest.approx(top5)
    assert written["results"]["demo_digits"]["samples"] == 12
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("eval_app", overrides=list(overrides))


def test_nothing_to_evaluate_and_missing_checkpoint_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="defines no evaluation"):
        run(_compose(f"checkpoint={tmp_path / 'x.ckpt'}", "eval=none"), "none")
    (tmp_path / "test" / "0").mkdir(parents=True)
    (tmp_path / "test" / "classnames.txt").write_text("zero\n")
    (tmp_path / "test" / "templates.txt").write_text("a {}\n")
    cfg = _compose(f"checkpoint={tmp_path / 'missing.ckpt'}", "eval=demo_digits", f"paths.demo_dir={tmp_path}")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        run(cfg, "demo_digits")
    (tmp_path / "test" / "classnames.txt").write_text("zero\none\nzero\n")
    with pytest.raises(InstantiationException, match="duplicated"):  # checked before the checkpoint is read
        run(cfg, "demo_digits")


@pytest.mark.parametrize("choice", ["none", "demo_digits", "imagenet_zeroshot", "retrieval"])
def test_every_eval_choice_composes(choice, tmp_path):
    cfg = _compose("checkpoint=x.ckpt", f"eval={choice}")
    assert set(cfg.eval) == {"callbacks"}
    for _name, node in cfg.eval.callbacks.items():
        assert node._target_.startswith("clip_pl.callbacks.")
        if choice in ("imagenet_zeroshot", "retrieval") and node.data is None:
            with pytest.raises(InstantiationException, match="no evaluation data given"):
                instantiate(node)
