#!/usr/bin/env bash
# Build .wheelhouse/ (git-ignored): the wheels the GPU machine needs for benchmarks/gpu.sh and lacks.
#   bash benchmarks/build_wheelhouse.sh                                  # with the project's .venv
#   CLIP_PL_PYTHON=/path/to/venv/bin/python bash benchmarks/build_wheelhouse.sh
#
# That machine (one H200, Python 3.12, x86-64, no network) has torch, lightning, timm, numpy, pillow,
# PyYAML, regex, huggingface_hub, safetensors, psutil, ninja, py-cpuinfo, msgpack, einops and
# nvidia-ml-py, but not Hydra, OmegaConf, open_clip, webdataset or DeepSpeed. Versions are pinned to
# the ones installed in the venv this script is run with (the ones `make test` runs), so the GPU check
# runs the code the CPU tests ran. Wheels for Python 3.12 manylinux x86-64 come from PyPI; the two
# packages published as source only (deepspeed, antlr4-python3-runtime) are built here as wheels,
# deepspeed without its C++/CUDA ops (DS_BUILD_OPS=0: ZeRO-2 with torch's AdamW needs none of them).
# wandb is left out: the check logs to CSV. The folder is emptied first, so it never holds two
# versions of one package (one duplicate stops the whole install there). ~11 MiB; the working tree
# that travels to the GPU machine, this folder included, must stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${CLIP_PL_PYTHON:-.venv/bin/python}
OUT=${WHEELHOUSE:-.wheelhouse}

# Published as wheels: fetched for the GPU machine's interpreter and platform, not this one's.
BINARY=(hydra-core omegaconf open_clip_torch ftfy wcwidth webdataset braceexpand hjson pydantic pydantic_core
        annotated-types typing-inspection typing_extensions)
# Published as source only: built here.
SOURCE=(deepspeed antlr4-python3-runtime)

version_of() {  # the version installed in $PY's environment, or a clear failure
    "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null \
        || { echo "build_wheelhouse: $1 is not installed in $PY's environment (run make setup)" >&2; exit 1; }
}
pins() { for name in "$@"; do echo "$name==$(version_of "$name")"; done; }

rm -rf "$OUT"
mkdir -p "$OUT"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$OUT" $(pins "${BINARY[@]}")
# --no-build-isolation: deepspeed's setup.py imports torch; an isolated build would download torch again.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" $(pins "${SOURCE[@]}")
ls -1 "$OUT"
du -sh "$OUT"
