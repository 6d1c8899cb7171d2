"""Zero-shot classification and retrieval evaluation (their training callbacks: clip_pl.callbacks.evaluation).

    python -m clip_pl.eval checkpoint=runs/x/checkpoints/last.ckpt eval=demo_digits
    python -m clip_pl.eval checkpoint=last.ckpt eval=imagenet_zeroshot paths.imagenet_val_dir=/data/imagenet/val

Names are imported lazily so ``clip_pl.load`` does not pay for Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "zero_shot_evaluate": "clip_pl.eval.zeroshot",
    "build_classifier": "clip_pl.eval.zeroshot",
    "retrieval_evaluate": "clip_pl.eval.retrieval",
    "retrieval_recall": "clip_pl.eval.retrieval",
    "load_classnames": "clip_pl.eval.labels",
    "load_templates": "clip_pl.eval.labels",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clip_pl.eval' has no attribute {name!r}")
