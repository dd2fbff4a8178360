# Shared environment for tcscale SLURM jobs; sourced by train.sbatch (TCSCALE_ENV_SH overrides the path).
# Keep it side-effect free apart from exports: it runs in the batch shell before srun.

# One CPU thread pool per rank unless the job gives each task more CPUs (--cpus-per-task).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
export PYTHONUNBUFFERED=1

# Activate the project's virtual environment when there is one and none is active.
if [[ -z ${VIRTUAL_ENV:-} && -z ${TCSCALE_PYTHON:-} && -x .venv/bin/python ]]; then
    export TCSCALE_PYTHON=$PWD/.venv/bin/python
fi

# --- NCCL knobs: uncomment what your fabric needs ---------------------------------------------------------
# export NCCL_DEBUG=WARN                   # INFO to see the chosen transports at start-up
# export NCCL_SOCKET_IFNAME=ib0            # interface for bootstrap / socket transport (^lo,docker to exclude)
# export NCCL_IB_HCA=mlx5                  # InfiniBand adapters to use
# export NCCL_IB_DISABLE=1                 # no InfiniBand: fall back to sockets
# export NCCL_P2P_DISABLE=1                # broken PCIe P2P on some boards
# export NCCL_ASYNC_ERROR_HANDLING=1       # abort collectives on a failed rank instead of hanging
# export TORCH_NCCL_BLOCKING_WAIT=0
# export CUDA_DEVICE_MAX_CONNECTIONS=1
