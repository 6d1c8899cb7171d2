"""Everything that watches or steers the Lightning training loop, one file a concern.

    checkpoint.py           StepCheckpoint: every n steps and the final step, folders swapped in atomically
    preemption.py           PreemptionCheckpoint: SIGUSR1/SIGTERM → the ranks agree, save, stop (requeue)
    telemetry.py            Telemetry: throughput, MFU, data wait, memory, bad samples; pause_clock
    heatmap.py              the similarity heatmap Telemetry draws
    progress.py             ThroughputProgressBar: samples/s and time left
    metrics_continuity.py   ContinueMetrics: a resumed run's CSV log continues at its step
    keys.py                 KeyRecorder: the sample keys each rank trained on (data.record_keys)
    evaluation.py           ZeroShotCallback, RetrievalCallback: evaluation during training
    loop.py                 RunEvents (events.jsonl), GradNorm, StepSleep (debug=throttle)

The configs name them as ``clip_pl.callbacks.<Name>`` (conf/callbacks, conf/eval). Names are
imported lazily, so importing one callback does not import the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "StepCheckpoint": "clip_pl.callbacks.checkpoint",
    "PreemptionCheckpoint": "clip_pl.callbacks.preemption",
    "Telemetry": "clip_pl.callbacks.telemetry",
    "pause_clock": "clip_pl.callbacks.telemetry",
    "ThroughputProgressBar": "clip_pl.callbacks.progress",
    "ContinueMetrics": "clip_pl.callbacks.metrics_continuity",
    "KeyRecorder": "clip_pl.callbacks.keys",
    "ZeroShotCallback": "clip_pl.callbacks.evaluation",
    "RetrievalCallback": "clip_pl.callbacks.evaluation",
    "RunEvents": "clip_pl.callbacks.loop",
    "GradNorm": "clip_pl.callbacks.loop",
    "StepSleep": "clip_pl.callbacks.loop",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clip_pl.callbacks' has no attribute {name!r}")
