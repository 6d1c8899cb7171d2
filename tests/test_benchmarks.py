"""Every CPU benchmark script runs, scaled down, through its own command line (the GPU check has its
dry-run in tests/test_gpu_check.py, the scale tables tests/test_scale_plan.py, the curation benchmark
tests/data_prep/test_score.py; the LiT comparison, benchmarks/lit_vs_scratch.py, trains two demo runs and
is not run here: its recipe, experiment=lit_demo, is, in tests/test_config.py). They report; these
tests check that each runs to its result and that the result is the shape RESULTS.md reads, not speed.

    pytest tests/test_benchmarks.py      # ~2 min on 2 cores
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _benchmark(*args: str, cwd: Path = REPO) -> str:
    done = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def test_train_throughput_compares_both_loops():
    result = _last_json(
        _benchmark(
            "benchmarks.train_throughput", "--steps", "4", "--warmup", "1", "--repeats", "1", "--batch-size", "8"
        )
    )
    assert result["clip_pl"] > 0 and result["open_clip"] > 0
    assert result["ratio"] == pytest.approx(result["clip_pl"] / result["open_clip"])


def test_train_throughput_refuses_a_run_with_no_timed_step():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_throughput", "--steps", "2", "--warmup", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--steps 2 must be at least --warmup + 2 = 3" in done.stderr


def test_grad_cache_memory_reports_each_chunk_count():
    result = _last_json(
        _benchmark("benchmarks.grad_cache_memory", "--model", "tiny", "--batch-size", "8", "--chunks", "1", "2")
    )
    assert set(result["peak_step_memory_mb_by_chunks"]) == {"1", "2"}
    assert result["ratio_to_unchunked"]["1"] == 1.0


def test_strategy_memory_shows_a_locked_tower_holding_less(tmp_path):
    out = tmp_path / "memory.json"
    _benchmark(
        "benchmarks.strategy_memory",
        "--model",
        "tiny",
        "--steps",
        "2",
        "--strategies",
        "ddp",
        "ddp_image_locked",
        "--json",
        str(out),
    )
    rows = json.loads(out.read_text())
    # a locked image tower drops its gradients and Adam moments: 12 of its 16 bytes per parameter
    assert rows["ddp_image_locked"]["model_state_mb"] < rows["ddp"]["model_state_mb"]


def test_the_eval_suite_benchmark_times_every_task_on_both_sides(tmp_path, capsys):
    from benchmarks.eval_suite import main

    result = main(["--per-class", "1", "--repeats", "1", "--json", str(tmp_path / "r.json")])
    assert set(result["tasks"]) == {"shapes", "shape_captions", "shapes_probe"}
    for row in result["tasks"].values():
        assert row["clip_pl_s"] > 0 and row["clip_benchmark_s"] > 0
        assert row["ratio"] == pytest.approx(row["clip_benchmark_s"] / row["clip_pl_s"])
    assert json.loads((tmp_path / "r.json").read_text()) == result
    assert "| all |" in capsys.readouterr().out


def test_loader_per_core_reports_each_corpus_against_its_decode(tmp_path):
    """``loader_bench --per-core`` on tiny corpora: every row has the CPU path, its decode-only reference,
    the ceiling of its stages and the device path's CPU share (the comparison with open_clip_train needs an
    old webdataset from PyPI and is not run here)."""
    out = tmp_path / "out.json"
    _benchmark(
        "benchmarks.loader_bench",
        "--per-core",
        "--out",
        str(tmp_path),
        "--laion-per-shard",
        "3",
        "--large-per-shard",
        "2",
        "--rounds",
        "1",
        "--batch-size",
        "4",
        "--json",
        str(out),
    )
    rows = json.loads(out.read_text())
    assert [r["corpus"].split(" (")[0] for r in rows] == ["synthetic JPEGs", "photo JPEGs", "large JPEGs"]
    for row in rows:
        assert row["samples"] == 8 * (2 if row["corpus"].startswith("large") else 3)
        assert row["decode_only"] == max(row["stage_rates"]["decode_pil"], row["stage_rates"]["decode_torchvision"])
        assert 0 < row["ratio"] == row["cpu_path"] / row["decode_only"]
        assert 0 < row["ceiling_ratio"] < row["ceiling_ratio_without_resize"] < 1
        assert row["device_path_cpu"] > 0
        assert set(row["one_worker"]) == {"cpu_path", "resize_on_device", "device_path"}, "each path in a worker too"
        assert all(rate > 0 for rate in row["one_worker"].values())
