#!/usr/bin/env bash
# The GPU check (one GPU, a few minutes; not part of `make test`): ViT-B/32 and ViT-B/16, bf16,
# synthetic data, ~100 steps each, clip_pl with ddp and deepspeed_stage_2 next to OpenCLIP's own
# train_one_epoch in the same run. Prints one JSON line per configuration (samples/s, MFU from
# clip_pl.callbacks.telemetry's device table, peak memory, and the ratio clip_pl / OpenCLIP).
#   bash benchmarks/gpu.sh                 # from the repository root, in the project's venv
#   STEPS=50 BATCH=128 bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${CLIP_PL_PYTHON:-python}
STEPS=${STEPS:-100}
BATCH=${BATCH:-256}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for model in vit_b32 vit_b16; do
    for strategy in ddp deepspeed_stage_2; do
        "$PY" -m benchmarks.train_throughput --model "$model" --batch-size "$BATCH" --steps "$STEPS" --warmup 10 \
            --precision bf16-mixed --accelerator gpu --strategy "$strategy"
    done
done
