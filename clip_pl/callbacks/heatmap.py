"""A picture of what the model learned: a batch's image-text similarity matrix, saved as a PNG.

Drawn by :class:`clip_pl.callbacks.telemetry.Telemetry` every ``heatmap_every_n_steps`` steps
(``callbacks.telemetry.heatmap_every_n_steps``), its time kept out of the throughput figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch


@torch.no_grad()
def save_similarity_heatmap(
    trainer: L.Trainer, pl_module: L.LightningModule, batch: Mapping[str, Any], size: int = 16
) -> Path | None:
    """The cosine similarity of the batch's first ``size`` images and texts, as
    ``RUN_DIR/plots/similarity_step<n>.png`` (rank 0; every rank runs the forward)."""
    n = min(size, batch["image"].shape[0])
    was_training = pl_module.training
    pl_module.eval()
    # Through the model's forward (pl_module.encode), where FSDP and ZeRO-3 gather their shards.
    image_features, text_features = pl_module.encode(batch["image"][:n], batch["text"][:n])[:2]
    pl_module.train(was_training)
    if trainer.global_rank != 0:
        return None
    similarity = (image_features @ text_features.T).float().cpu().numpy()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(similarity, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set(title=f"cosine similarity, step {trainer.global_step}", xlabel="text", ylabel="image")
    path = Path(trainer.default_root_dir) / "plots" / f"similarity_step{trainer.global_step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key="train/similarity", images=[str(path)], step=trainer.global_step)
    return path
