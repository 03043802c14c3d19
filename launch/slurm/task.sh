#!/usr/bin/env bash
# One training rank under srun: map SLURM's task variables to the ones tritower reads, then exec
# python so the rank itself is the task and receives SLURM's --signal (SIGUSR1) directly.
set -euo pipefail
export RANK="$SLURM_PROCID" WORLD_SIZE="$SLURM_NTASKS" LOCAL_RANK="$SLURM_LOCALID"
export LOCAL_WORLD_SIZE="${SLURM_NTASKS_PER_NODE:-$SLURM_NTASKS}"
exec python "$@"
