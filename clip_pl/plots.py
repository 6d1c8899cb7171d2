"""Training curves from a run's CSV metrics: loss (and temperature) and zero-shot accuracy vs step.

python -m clip_pl.plots runs/demo/csv/metrics.csv runs/demo/plots/curves.png
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def read_series(metrics_csv: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), …]} from a Lightning CSV log (rows hold only what was logged)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            if not row.get("step"):
                continue
            step = int(float(row["step"]))
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(key, []).append((step, float(value)))
    return series


def plot_training_curves(metrics_csv: str | Path, out_png: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    series = read_series(metrics_csv)
    accuracy_keys = sorted(k for k in series if k.startswith("eval/") and k.endswith("/top1"))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if "train/loss" in series:
        ax_loss.plot(*zip(*series["train/loss"]), label="train loss")
    ax_loss.set(xlabel="step", ylabel="contrastive loss", title="training loss")
    if "train/temperature" in series:
        twin = ax_loss.twinx()
        twin.plot(*zip(*series["train/temperature"]), color="tab:orange", alpha=0.6, label="exp(logit_scale)")
        twin.set_ylabel("exp(logit_scale)")
    for key in accuracy_keys:
        steps, values = zip(*series[key])
        ax_acc.plot(steps, [100 * v for v in values], marker="o", label=key.split("/")[1])
    ax_acc.set(xlabel="step", ylabel="top-1 (%)", title="zero-shot accuracy", ylim=(0, 100))
    if accuracy_keys:
        ax_acc.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m clip_pl.plots METRICS_CSV OUT_PNG")
    print(plot_training_curves(sys.argv[1], sys.argv[2]))
