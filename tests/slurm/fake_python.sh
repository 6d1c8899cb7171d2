#!/usr/bin/env bash
# Stands in for CLIP_PL_PYTHON in tests/slurm/test_launch_scripts.py: answers the launch script's
# `-c` import check with the real interpreter ($REAL_PYTHON), and instead of training records what
# each task was started with (node, rank, rendezvous, working dir, argv) in $FAKE_OUT/task-<rank>.txt.
if [[ "${1:-}" == "-c" ]]; then
    exec "$REAL_PYTHON" "$@"
fi
{
    echo "node=$SLURMD_NODENAME"
    echo "procid=$SLURM_PROCID"
    echo "master=$MASTER_ADDR"
    echo "cwd=$PWD"
    printf 'arg=%s\n' "$@"
} > "$FAKE_OUT/task-$SLURM_PROCID.txt"
