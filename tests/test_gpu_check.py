"""The GPU check (benchmarks/gpu.sh) runs end to end on CPU, so it cannot rot between GPU runs.

The dry-run is the same script and the same code paths as on the GPU: every run in a fresh process
under its timeout, clip_pl through its real Trainer, OpenCLIP through ``train_one_epoch``, the same
weights and batches on both sides, the trajectory comparison, the compile / grad-cache / DeepSpeed
ZeRO-2 variants, the loader alone, the profiler and the report. Only the sizes differ (tiny model,
3 timed steps, batch 8, 2 loader workers) and, on CPU, ``model.compile`` uses the aot_eager backend
(dynamo and AOTAutograd without inductor's C++ build; inductor is tests/test_compile.py's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import BF16_TOLERANCE, PLANS, build_report

REPO = Path(__file__).resolve().parents[1]
EXPECTED_RUNS = [
    "env",
    "open_clip-tiny",
    "clip_pl-tiny",
    "loader",
    "clip_pl-tiny-grad_cache4",
    "clip_pl-tiny-deepspeed2",
    "clip_pl-tiny-compile",
    "loader_device",
    "loader_resize_device",
]


@pytest.mark.slow
def test_the_gpu_check_runs_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "CLIP_PL_PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--device", "cpu", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{log[-4000:]}"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "profiles.txt", "results.json", "results.md"]
    report = json.loads((out / "results.json").read_text())
    assert report["ok"] and not report["problems"]
    assert list(report["runs"]) == EXPECTED_RUNS
    assert all(run["status"] == "ok" for run in report["runs"].values())

    runs = {name: run["result"] for name, run in report["runs"].items()}
    ours, theirs = runs["clip_pl-tiny"], runs["open_clip-tiny"]
    plan = PLANS["cpu"]
    total = plan.warmup + plan.steps + plan.profile_steps
    assert len(ours["losses"]) == len(theirs["losses"]) == total
    assert ours["weights_fingerprint"] == theirs["weights_fingerprint"]
    assert ours["no_decay_parameters"] == theirs["no_decay_parameters"]
    assert ours["backend_settings_after"] == theirs["backend_settings_after"]
    first = report["trajectories"][0]
    assert first["compared"] == "clip_pl vs open_clip" and first["agree"] and first["steps"] == total
    assert len(report["trajectories"]) == 4 and all(t["agree"] for t in report["trajectories"])

    for name in EXPECTED_RUNS[1:3] + EXPECTED_RUNS[4:-2]:
        result = runs[name]
        assert result["samples_per_s"] > 0 and result["step_ms"] > 0 and result["peak_rss_gb"] > 0
        assert result["profile"]["top"] and "Self CPU" in result["profile"]["table"]
    assert "DeepSpeed" in runs["clip_pl-tiny-deepspeed2"]["strategy"]
    assert runs["clip_pl-tiny-compile"]["compiled_graphs"] > 0
    # The fixed telemetry: the batches are ready in memory, so the run logged (almost) no data wait.
    assert ours["telemetry"]["perf/data_wait_share"] < 0.05
    assert runs["loader"]["samples_per_s"] > 0 and runs["loader"]["workers"] == plan.loader_workers
    assert runs["loader_device"]["samples_per_s"] > 0 and runs["loader_device"]["decode_on"] == "device"
    assert runs["loader_resize_device"]["samples_per_s"] > 0 and runs["loader_resize_device"]["resize_on"] == "device"
    assert {row["run"] for row in report["comparisons"]} == {
        "open_clip",
        "clip_pl",
        "clip_pl grad_cache4",
        "clip_pl deepspeed2",
        "clip_pl compile",
    }
    assert "| tiny | clip_pl |" in (out / "results.md").read_text()


def fake_side(losses: list[float], samples_per_s: float = 100.0) -> dict:
    return {
        "losses": losses,
        "weights_fingerprint": [1.0, 2.0],
        "no_decay_parameters": ["bias"],
        "samples_per_s": samples_per_s,
        "step_ms": 10.0,
        "mfu": 0.3,
        "tflops": 1.0,
        "peak_memory_gb": 1.0,
    }


def test_the_report_flags_trajectories_that_differ_and_runs_that_failed():
    plan = PLANS["cpu"]
    base = [5.0, 4.9, 4.8]

    def report(clip_pl_losses, status="ok"):
        runs = {
            "open_clip-tiny": {"status": "ok", "result": fake_side(base)},
            "clip_pl-tiny": {"status": "ok", "result": fake_side(clip_pl_losses, 110.0)},
            "clip_pl-tiny-compile": {"status": status, "seconds": 1, "timeout_s": 1},
        }
        return build_report(plan, "cpu", runs)

    close = report([b * (1 + BF16_TOLERANCE / 2) for b in base])
    assert close["ok"] and close["trajectories"][0]["agree"]
    assert close["comparisons"][1]["vs_open_clip"] == pytest.approx(1.1)
    apart = report([5.0, 4.9, 4.8 * (1 + 2 * BF16_TOLERANCE)])
    assert not apart["ok"] and "loss trajectories differ" in apart["problems"][0]
    assert report(base, status="timeout")["problems"] == ["clip_pl-tiny-compile: timeout"]
