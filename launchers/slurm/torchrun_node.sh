#!/bin/bash
# One node of a multi-node run: torchrun starting NPROC_PER_NODE ranks here, which meet the other nodes' ranks
# through a c10d rendezvous at MASTER_ADDR:MASTER_PORT. train.sbatch runs it once per node (one srun task per
# node); tests run two on one machine (NODE_RANK 0 and 1, MASTER_ADDR=127.0.0.1).
#
#   NNODES=2 NODE_RANK=0 NPROC_PER_NODE=8 MASTER_ADDR=node001 MASTER_PORT=29500 RDZV_ID=job42 \
#       launchers/slurm/torchrun_node.sh PYTHON launchers/train.py --config CONFIG [key=value ...]
#
# The c10d rendezvous: the store lives in the launcher of NODE_RANK 0 (is_host), the others connect to it and may
# start in any order within RDZV_TIMEOUT. torchrun gives the global ranks in the order of the sorted node
# descriptors (host name, pid), not by NODE_RANK (torchrun ignores --node-rank for c10d, so it is not passed);
# each rank gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK (its node's place), MASTER_ADDR/PORT.
# No --max-restarts: a failed rank fails the job (SLURM requeues; the trainer resumes from the last checkpoint).
#
# Signals: torchrun handles SIGUSR1 (SLURM's preemption warning, forwarded by srun) besides the usual ones and
# passes it to its ranks, which checkpoint and exit 75; it waits TCSCALE_SHUTDOWN_S for them before killing them.
#
# Environment: NNODES, NODE_RANK, NPROC_PER_NODE [1], MASTER_ADDR, MASTER_PORT, RDZV_ID [tcscale],
#              RDZV_TIMEOUT [900 s], TCSCALE_SHUTDOWN_S [600 s], TCSCALE_TORCHRUN_ARGS (extra flags, word-split).
set -uo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: NNODES=N NODE_RANK=I MASTER_ADDR=H MASTER_PORT=P $0 PYTHON SCRIPT [args ...]" >&2
    exit 2
fi
PYTHON=$1
shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}" "${MASTER_PORT:?set MASTER_PORT}"
IS_HOST=0
((NODE_RANK == 0)) && IS_HOST=1

# shellcheck disable=SC2086
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --nproc-per-node="${NPROC_PER_NODE:-1}" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="${RDZV_ID:-tcscale}" \
    --rdzv-conf="is_host=$IS_HOST,join_timeout=${RDZV_TIMEOUT:-900}" \
    --max-restarts=0 --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout="${TCSCALE_SHUTDOWN_S:-600}" \
    ${TCSCALE_TORCHRUN_ARGS:-} \
    "$@"
