#!/usr/bin/env bash
# The GPU check, one command: clip_pl next to OpenCLIP's own training loop (ViT-B/16 and ViT-B/32,
# bf16, batch 256, the same weights and the same GPU-resident batches), the 20-step loss trajectories,
# clip_pl with model.compile / grad_cache_chunks=4 / deepspeed_stage_2, and the loader alone on the
# machine's cores. Each run is a fresh process under its own timeout, all inside a 420 s budget.
# Writes OUT/results.json, OUT/results.md (the table for benchmarks/RESULTS.md), OUT/profiles.txt and
# OUT/gpu_check.log. What each run does: benchmarks/gpu_check.py.
#
#   bash benchmarks/build_wheelhouse.sh         # first, here: .wheelhouse/ (git-ignored) for the GPU machine
#   bash benchmarks/gpu.sh "$OUT"               # there: the device tool's run, with carry [".wheelhouse"]
#   bash benchmarks/gpu.sh --device cpu /tmp/gc # the CPU dry-run (tiny model, 3 steps): tests/test_gpu_check.py
#
# With a .wheelhouse/ folder and no Hydra importable (the GPU machine), the wheels are installed with
# pip --no-index into a side folder put first on PYTHONPATH. Python: $CLIP_PL_PYTHON, else the
# project's .venv, else python3. Exit status 0: every run finished and the trajectories agree.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
if [[ "${1:-}" == "--device" ]]; then DEVICE=$2; shift 2; fi
OUT=${1:?usage: bash benchmarks/gpu.sh [--device cuda|cpu] OUT_DIR}
mkdir -p "$OUT"
if [[ -n "${CLIP_PL_PYTHON:-}" ]]; then PY=$CLIP_PL_PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi

if [[ -d .wheelhouse ]] && ! "$PY" -c "import hydra" 2>/dev/null; then
    SITE=${TMPDIR:-/tmp}/clip_pl_site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .wheelhouse/*.whl 2>&1 | tee -a "$OUT/gpu_check.log"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[[ "$DEVICE" == cuda ]] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    | tee -a "$OUT/gpu_check.log"
# The driver's own budget is 420 s (runs) + the report; this outer limit only catches a driver that hangs.
timeout -k 10 450 "$PY" -m benchmarks.gpu_check all --device "$DEVICE" --out "$OUT"
