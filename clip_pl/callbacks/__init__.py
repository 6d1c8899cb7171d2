"""Everything that watches or steers the Lightning training loop, one file a concern.

    checkpoint.py           StepCheckpoint: every n steps and the final step, folders swapped in atomically
    preemption.py           PreemptionCheckpoint: SIGUSR1/SIGTERM → the ranks agree, save, stop (requeue)
    telemetry.py            Telemetry: throughput, MFU, data wait, memory, bad samples; pause_clock
    heatmap.py              the similarity heatmap Telemetry draws
    progress.py             ThroughputProgressBar: samples/s and time left
    metrics_continuity.py   ContinueMetrics: a resumed run's CSV log continues at its step
    keys.py                 KeyRecorder: the sample keys each rank trained on (data.record_keys)
    ema.py                  EMA: an fp32 moving average of the weights, kept in the checkpoint (callbacks.ema)
    evaluation.py           ZeroShotCallback, RetrievalCallback, SuiteCallback: evaluation during training
    loop.py                 RunEvents (events.jsonl), GradNorm, StepSleep (debug=throttle)

The configs name them as ``clip_pl.callbacks.<Name>`` (conf/callbacks, conf/eval). Names are
imported lazily, so importing one callback does not import the others.
"""

from __future__ import annotations

from clip_pl._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "checkpoint": ["StepCheckpoint"],
        "preemption": ["PreemptionCheckpoint"],
        "telemetry": ["Telemetry", "pause_clock"],
        "progress": ["ThroughputProgressBar"],
        "metrics_continuity": ["ContinueMetrics"],
        "keys": ["KeyRecorder"],
        "ema": ["EMA"],
        "evaluation": ["ZeroShotCallback", "RetrievalCallback", "SuiteCallback"],
        "loop": ["RunEvents", "GradNorm", "StepSleep"],
    },
)
