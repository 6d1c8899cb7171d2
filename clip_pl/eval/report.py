"""Evaluation results as a printed table and a JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """One row per (task, metric): rates as percentages, counts as integers."""
    rows = [("task", "metric", "value")]
    for task, metrics in results.items():
        for metric, value in metrics.items():
            if metric == "seconds":
                shown = f"{value:.1f}"
            elif isinstance(value, int):  # counts (samples, images …)
                shown = str(value)
            else:
                shown = f"{100 * value:.2f} %"
            rows.append((task, metric, shown))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path
