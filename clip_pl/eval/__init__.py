"""Zero-shot classification, retrieval and linear-probe evaluation, one task at a time or as a suite read
from a YAML task list (tasks.py, suite.py); their training callbacks: clip_pl.callbacks.evaluation.

    python -m clip_pl.eval checkpoint=runs/x/checkpoints/last.ckpt eval=demo_digits
    python -m clip_pl.eval checkpoint=last.ckpt eval=suite eval.task_list=demo_out/tasks/tasks.yaml
    python -m clip_pl.eval checkpoint=last.ckpt eval=imagenet_zeroshot paths.imagenet_val_dir=/data/imagenet/val

Names are imported lazily so ``clip_pl.load`` does not pay for Lightning.
"""

from __future__ import annotations

from clip_pl._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "zeroshot": ["zero_shot_evaluate", "build_classifier"],
        "retrieval": ["retrieval_evaluate", "retrieval_recall"],
        "labels": ["load_classnames", "load_templates"],
        "tasks": ["load_task_list", "TaskListError"],
        "suite": ["evaluate_tasks", "suite_average"],
        "linear_probe": ["linear_probe_evaluate"],
    },
)
