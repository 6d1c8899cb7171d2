"""Evaluation results as a printed table and a JSON file."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _shown(metric: str, value: Any) -> str:
    if metric == "seconds":
        return f"{value:.1f}"
    if metric == "weight_decay":  # the linear probe's chosen regularisation, not a rate
        return f"{value:.3g}"
    if isinstance(value, int):  # counts (samples, images …)
        return str(value)
    return f"{100 * value:.2f} %"


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """One row per (task, metric): rates as percentages, counts as integers."""
    rows = [("task", "metric", "value")]
    for task, metrics in results.items():
        for metric, value in metrics.items():
            rows.append((task, metric, _shown(metric, value)))
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


def format_suite_table(metrics: Mapping[str, Any], tasks: Sequence[tuple[str, str, str]]) -> str:
    """A suite's flat ``<task>/<metric>`` results as one table (each task's main metric first), then the
    average of the main metrics. ``tasks``: (name, type, main metric) in the list's order."""
    rows = [("task", "type", "metric", "value")]
    for name, task_type, main in tasks:
        prefix = f"{name}/"
        own = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
        for metric in [main] + [m for m in own if m != main]:
            rows.append((name, task_type, metric + (" *" if metric == main else ""), _shown(metric, own[metric])))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d:>{widths[3]}}" for a, b, c, d in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("-" * len(lines[0]))
    lines.append(
        f"average of the {len(tasks)} main metrics (*), DataComp-style: {100 * float(metrics['average']):.2f} %"
    )
    return "\n".join(lines)
