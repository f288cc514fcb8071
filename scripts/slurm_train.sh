#!/usr/bin/env bash
# Multi-node training under SLURM: one `accelerate launch` per node (srun, one task per node),
# each starting one process per GPU of its node; together they form one job of
# nodes x GPUs-per-node processes (DDP over NCCL, configs/accelerate/multi_node.yaml).
#
#   sbatch scripts/slurm_train.sh configs/mnist_ldm.yaml [key.sub=value ...]
#   sbatch --nodes=4 --gpus-per-node=4 scripts/slurm_train.sh configs/mnist_ldm.yaml seed=1
#
# Arguments are those of `scripts/train.py` after `--config` (the run config, then overrides).
# Submit from the repository root with stagediff's Python environment active: srun passes the
# environment on. The run's output_dir must be on a filesystem every node sees.
# Environment knobs: MAIN_PROCESS_PORT (default 29500; any port free between the nodes),
# GPUS_PER_NODE (default: what SLURM allotted), ACCELERATE_CONFIG (default the multi-node file).
#
#SBATCH --job-name=stagediff
#SBATCH --nodes=2                 # machines
#SBATCH --gpus-per-node=8         # GPUs per machine: one training process each
#SBATCH --ntasks-per-node=1       # one launcher per machine; accelerate starts the per-GPU processes
#SBATCH --cpus-per-task=32        # CPU cores per machine, for the data loaders
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: sbatch scripts/slurm_train.sh RUN_CONFIG.yaml [key.sub=value ...]" >&2
    exit 2
fi
: "${SLURM_JOB_NODELIST:?no SLURM allocation: submit this script with sbatch}"
cd "${SLURM_SUBMIT_DIR:-.}"

# Rendezvous: the first node of the allocation hosts process 0. (Not `| head -n 1`: under
# pipefail, scontrol killed by SIGPIPE when head exits early would fail the job at random.)
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MAIN_PROCESS_IP=${HOSTS%%$'\n'*}
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
if [[ -z "$GPUS_PER_NODE" && -n "${SLURM_GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE=${SLURM_GPUS_PER_NODE##*:}   # it may read "a100:8": keep the count
fi
if [[ -z "$GPUS_PER_NODE" ]]; then
    echo "slurm_train.sh: cannot tell the GPUs per node; request --gpus-per-node or set GPUS_PER_NODE" >&2
    exit 2
fi
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))   # accelerate wants the total over all machines
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/multi_node.yaml}
export MAIN_PROCESS_IP MAIN_PROCESS_PORT NUM_PROCESSES ACCELERATE_CONFIG
echo "slurm_train.sh: $SLURM_NNODES nodes x $GPUS_PER_NODE GPUs = $NUM_PROCESSES processes," \
     "main process on $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT"

# Single quotes: SLURM_NODEID (this node's rank in the job, 0 .. nodes - 1) must be read by each
# srun task on its own node, not here in the batch script (where it is always 0).
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
    exec accelerate launch --config_file "$ACCELERATE_CONFIG" \
        --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
        --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" \
        --num_processes "$NUM_PROCESSES" \
        scripts/train.py --config "$@"
' slurm_train "$@"
