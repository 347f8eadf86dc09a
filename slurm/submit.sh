#!/bin/bash
# Submit a DualNER stage to Slurm with the allocation given as variables:
#
#   STAGE=1 CONFIG=configs/xlmr_base_stage1.yaml NODES=2 GPUS_PER_NODE=8 PARTITION=gpu TIME=24:00:00 \
#       bash slurm/submit.sh [key=value overrides]
#
# One task per GPU (TASKS_PER_NODE defaults to GPUS_PER_NODE; GPUS_PER_NODE=0 TASKS_PER_NODE=2 runs
# CPU ranks). Prints sbatch's "Submitted batch job N". Any other sbatch option: SBATCH_EXTRA.
set -euo pipefail
cd "$(dirname "$0")/.."

STAGE=${STAGE:-1}
CONFIG=${CONFIG:-}
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TASKS_PER_NODE=${TASKS_PER_NODE:-$GPUS_PER_NODE}
CPUS_PER_TASK=${CPUS_PER_TASK:-8}
PARTITION=${PARTITION:-}
TIME=${TIME:-24:00:00}
SIGNAL_SECONDS=${SIGNAL_SECONDS:-300}  # SIGUSR1 this long before the time limit: checkpoint + requeue
JOB_NAME=${JOB_NAME:-dualner-stage$STAGE}
LOG_DIR=${LOG_DIR:-slurm/logs}
SBATCH_EXTRA=${SBATCH_EXTRA:-}

if [ "$TASKS_PER_NODE" -lt 1 ]; then echo "TASKS_PER_NODE must be at least 1" >&2; exit 2; fi
mkdir -p "$LOG_DIR"
options=(--job-name "$JOB_NAME" --nodes "$NODES" --ntasks-per-node "$TASKS_PER_NODE"
         --cpus-per-task "$CPUS_PER_TASK" --time "$TIME" --signal "USR1@$SIGNAL_SECONDS"
         --output "$LOG_DIR/%x-%j.out" --export "ALL,STAGE=$STAGE${CONFIG:+,CONFIG=$CONFIG},REPO=$PWD")
if [ "$GPUS_PER_NODE" -gt 0 ]; then options+=(--gpus-per-node "$GPUS_PER_NODE"); fi
if [ -n "$PARTITION" ]; then options+=(--partition "$PARTITION"); fi
# shellcheck disable=SC2086  # SBATCH_EXTRA is a list of options
exec sbatch "${options[@]}" $SBATCH_EXTRA slurm/dualner.sbatch "$@"
