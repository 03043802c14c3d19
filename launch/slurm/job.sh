#!/usr/bin/env bash
# The body shared by the sbatch scripts; sourced from them inside the allocation.
#
# Why one srun task per GPU and no `deepspeed` launcher: the launcher needs ssh/pdsh between
# nodes and forwards only SIGINT/SIGTERM to its children, so SLURM's early-warning SIGUSR1 would
# never reach the ranks. With `srun` every rank is a task of the job step: `--signal=USR1@T` is
# delivered to each of them, and srun itself propagates failures (--kill-on-bad-exit).
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
mkdir -p logs

RUN_NAME="${RUN_NAME:-${SLURM_JOB_NAME:-tritower}}"
ZERO="${ZERO:-zero_configs/z3.json}"
REQUEUE_EXIT_CODE=75  # tritower.launch.lifecycle.preemption.REQUEUE_EXIT_CODE

export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
export TOKENIZERS_PARALLELISM=false
# NCCL and network: set what your cluster needs, e.g.
#   export NCCL_SOCKET_IFNAME=ib0         # the interface ranks talk over
#   export NCCL_IB_HCA=mlx5               # InfiniBand adapters
#   export NCCL_DEBUG=WARN                # INFO to debug hangs
#   export NCCL_ASYNC_ERROR_HANDLING=1    # fail instead of hanging when a rank dies
#   export WANDB_MODE=offline             # compute nodes without internet

echo "tritower job ${SLURM_JOB_ID:-?}: ${SLURM_NNODES:-1} node(s), ${SLURM_NTASKS} ranks, master ${MASTER_ADDR}:${MASTER_PORT}, run ${RUN_NAME}"
set +e
srun --kill-on-bad-exit=1 launch/slurm/task.sh launch/train.py --zero "$ZERO" \
    --train.run_name="$RUN_NAME" --resume=auto "$@"
status=$?
set -e
if [ "$status" -eq "$REQUEUE_EXIT_CODE" ]; then
    echo "tritower: preempted with a checkpoint written; requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
