#!/usr/bin/env bash
# CLIP pre-training on 256 GPUs: 32 nodes × 8 GPUs, one task per GPU, requeued on preemption/time limit.
#
#   cd <repository root>
#   sbatch slurm/train_256gpu.sh experiment=<name> [hydra overrides…]
#   sbatch --partition=<p> --account=<a> --time=12:00:00 slurm/train_256gpu.sh experiment=<name>
#   # sbatch flags on the command line beat the #SBATCH lines below, e.g. the CPU test of this file:
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1 \
#       slurm/train_256gpu.sh model=tiny data=synthetic trainer=cpu strategy.process_group_backend=gloo …
#
# This file holds topology only; the experiment lives in clip_pl/conf/experiment/. trainer.num_nodes and
# trainer.devices are filled from SLURM's environment (slurm/launch.sh). Python: see
# CLIP_PL_PYTHON / CLIP_PL_VENV in slurm/launch.sh. Preemption and requeue: clip_pl/callbacks/preemption.py (see launch.sh).
# Run directory: ${paths.root_dir}/runs/$SLURM_JOB_ID, found again by the requeued job (same id).
#
#SBATCH --job-name=clip-256gpu
#SBATCH --nodes=32
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
# --open-mode=append: a requeued job writes on after its first life's log instead of truncating it.
# --output is relative to the submit directory (the repository root), where slurm/logs/ exists.

# sbatch runs a copy of this file from its spool directory: the repository is the submit directory.
cd "${SLURM_SUBMIT_DIR:?not inside a SLURM job: submit this file with sbatch}"
if [[ ! -f slurm/launch.sh ]]; then
    echo "error: sbatch was run from $PWD, which is not the clip_pl repository root" \
         "(no slurm/launch.sh). cd to the repository and submit again." >&2
    exit 2
fi
exec bash slurm/launch.sh "$@"
