#!/usr/bin/env bash
# CLIP training on one node × 8 GPUs (debugging an experiment, small runs); same launch as 256 GPUs.
#
#   cd <repository root>
#   sbatch slurm/train_1node.sh experiment=<name> [hydra overrides…]
#   sbatch --gpus-per-node=4 --ntasks-per-node=4 slurm/train_1node.sh experiment=<name>   # 4 GPUs
#
# Topology only; trainer.num_nodes / trainer.devices come from SLURM's environment (slurm/launch.sh,
# which also documents CLIP_PL_PYTHON / CLIP_PL_VENV and how preemption saves and requeues).
#
#SBATCH --job-name=clip-1node
#SBATCH --nodes=1
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

# sbatch runs a copy of this file from its spool directory: the repository is the submit directory.
cd "${SLURM_SUBMIT_DIR:?not inside a SLURM job: submit this file with sbatch}"
if [[ ! -f slurm/launch.sh ]]; then
    echo "error: sbatch was run from $PWD, which is not the clip_pl repository root" \
         "(no slurm/launch.sh). cd to the repository and submit again." >&2
    exit 2
fi
exec bash slurm/launch.sh "$@"
