#!/usr/bin/env bash
# The body shared by every clip_pl batch script: environment, topology → Hydra, srun. Not submitted
# by itself: slurm/train_256gpu.sh and slurm/train_1node.sh hold the #SBATCH topology and exec this.
#
#   sbatch slurm/train_256gpu.sh experiment=<name> [hydra overrides…]   # from the repository root
#
# Environment it reads (sbatch exports the submitting shell's environment to the job):
#   CLIP_PL_PYTHON  the python that has clip_pl installed (default: `python` on PATH, i.e. the venv
#                   that was active when you ran sbatch)
#   CLIP_PL_VENV    alternatively, a venv to activate first (e.g. $PWD/.venv after `make setup`)
#   NCCL_* / TORCH_NCCL_*  see "NCCL" below; anything you export before sbatch wins over the defaults.
#
# Preemption: `#SBATCH --signal=SIGUSR1@120` (no `B:`) makes SLURM send SIGUSR1 to every process of
# the srun step 120 s before the time limit (`scancel --signal=USR1` does the same by hand); a
# preempting job sends SIGTERM. clip_pl.callbacks.preemption.PreemptionCheckpoint (callbacks.preemption) only
# records the signal in its handler; after the next optimizer step all ranks agree (one all-reduce),
# save `hpc_ckpt_<step>.ckpt` together in the run directory and stop; for SIGUSR1 rank 0 then runs
# `scontrol requeue $SLURM_JOB_ID`. The requeued job keeps its job id, so it lands in the same run
# directory (runs/$SLURM_JOB_ID) and resume=auto continues from the newest checkpoint there.
# This script therefore installs no signal trap: do not add one, and do not turn the signal into
# `B:USR1` (the batch shell would get it instead of the trainer).
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:?not inside a SLURM job: submit slurm/train_*.sh with sbatch}"
: "${SLURM_NTASKS_PER_NODE:?the batch script must set --ntasks-per-node (one task per GPU, = trainer.devices)}"

if [[ -n "${CLIP_PL_VENV:-}" ]]; then
    # shellcheck disable=SC1091
    source "$CLIP_PL_VENV/bin/activate"
fi
PYTHON="${CLIP_PL_PYTHON:-python}"
# Fail here, on one node, before 8 × N tasks start and each fails the same way.
if ! "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('clip_pl') is None)"; then
    echo "error: '$PYTHON' cannot import clip_pl. Activate the project's venv before sbatch," \
         "or export CLIP_PL_PYTHON=/path/to/venv/bin/python (or CLIP_PL_VENV=/path/to/venv)." >&2
    exit 2
fi
if [[ " $* " != *" experiment="* ]]; then
    echo "warning: no experiment=… override given; training the default config on" \
         "$SLURM_JOB_NUM_NODES node(s) × $SLURM_NTASKS_PER_NODE task(s)." >&2
fi

# Rendezvous: Lightning's SLURMEnvironment reads these; setting them here makes them visible in the log.
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"  # first host of the node list
export MASTER_ADDR
# Per job (jobs can share a node), and below Linux's ephemeral range (32768-60999 by default), where
# an outgoing connection of any process on the node could already hold the port: 10000-29999.
export MASTER_PORT="${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}"

# NCCL (ignored by the gloo/CPU runs of the tests):
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1  a failed or hung collective aborts the process group and the
#       process exits, so srun --kill-on-bad-exit ends the step instead of idling 256 GPUs until
#       the time limit.
#   NCCL_DEBUG=WARN                    INFO when debugging topology / transport selection.
#   Site-specific, export before sbatch if your fabric needs them: NCCL_SOCKET_IFNAME (the bootstrap
#   interface, e.g. ib0 or ^lo,docker0), NCCL_IB_HCA (which InfiniBand HCAs to use),
#   NCCL_IB_GID_INDEX (RoCE), NCCL_NET_GDR_LEVEL (GPUDirect RDMA distance).
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# One intra-op thread per rank: data loading runs in worker processes, and 8 ranks × all cores
# of threads would oversubscribe the node.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONUNBUFFERED=1   # the log must be complete when a requeue kills the step
export HYDRA_FULL_ERROR=1   # full tracebacks in the job log

restart="${SLURM_RESTART_COUNT:-0}"
echo "[$(date -u +%FT%TZ)] job $SLURM_JOB_ID restart $restart: $SLURM_JOB_NUM_NODES node(s) ($SLURM_JOB_NODELIST)" \
     "× $SLURM_NTASKS_PER_NODE task(s), MASTER_ADDR=$MASTER_ADDR:$MASTER_PORT, python=$(command -v "$PYTHON")"

# srun ≥ 22.05 no longer inherits --cpus-per-task from the allocation: pass it on so each rank
# (and its data-loader workers) gets its cores. Every task sees all the node's GPUs; Lightning
# picks cuda:$SLURM_LOCALID. The topology goes to Hydra before "$@" so the user passes only
# experiment=… and overrides.
srun_args=(--kill-on-bad-exit=1)
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
fi
exec srun "${srun_args[@]}" "$PYTHON" -m clip_pl.train \
    trainer.num_nodes="$SLURM_JOB_NUM_NODES" \
    trainer.devices="$SLURM_NTASKS_PER_NODE" \
    "$@"
