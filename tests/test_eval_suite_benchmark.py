"""benchmarks/eval_suite.py runs (at its smallest): both sides time every task and the ratios are written.

    pytest tests/test_eval_suite_benchmark.py
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("clip_benchmark")


def test_the_eval_suite_benchmark_times_every_task_on_both_sides(tmp_path, capsys):
    from benchmarks.eval_suite import main

    result = main(["--per-class", "1", "--repeats", "1", "--json", str(tmp_path / "r.json")])
    assert set(result["tasks"]) == {"shapes", "shape_captions", "shapes_probe"}
    for row in result["tasks"].values():
        assert row["clip_pl_s"] > 0 and row["clip_benchmark_s"] > 0
        assert row["ratio"] == pytest.approx(row["clip_benchmark_s"] / row["clip_pl_s"])
    assert json.loads((tmp_path / "r.json").read_text()) == result
    assert "| all |" in capsys.readouterr().out
