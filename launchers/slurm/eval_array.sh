#!/bin/bash
# Submit an evaluation as an array of N tasks (launchers/slurm/eval.sbatch: one GPU each, a share of the items)
# plus the merge job that runs once every task succeeded (--dependency=afterok; cancelled if one fails).
#
#   TCSCALE_SBATCH_ARGS="--partition=gpu --gpus=1 --cpus-per-task=8" \
#       launchers/slurm/eval_array.sh N CONFIG [key=value ...]
#
# Prints "array <job id> (N tasks), merge <job id>". Rerunning the same command resumes: finished images and
# detections are skipped, the merge scores again. Knobs: TCSCALE_SBATCH_ARGS (word-split flags for both jobs),
# TCSCALE_EVAL_PARALLEL (at most this many tasks at once: --array=0-(N-1)%P), TCSCALE_EVAL_WAIT=1 (wait for the
# merge and exit with its status). Submit from the repository root (the jobs cd to SLURM_SUBMIT_DIR).
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: launchers/slurm/eval_array.sh N CONFIG [key=value ...]" >&2
    exit 2
fi
N=$1
shift
if ! [[ $N =~ ^[1-9][0-9]*$ ]]; then
    echo "eval_array.sh: N must be a positive integer, got '$N'" >&2
    exit 2
fi
HERE=$(dirname "$0")
RANGE="0-$((N - 1))${TCSCALE_EVAL_PARALLEL:+%$TCSCALE_EVAL_PARALLEL}"
# shellcheck disable=SC2086
ARRAY=$(TCSCALE_EVAL_SHARDS=$N sbatch --parsable --array="$RANGE" ${TCSCALE_SBATCH_ARGS:-} "$HERE/eval.sbatch" "$@")
ARRAY=${ARRAY%%;*}
WAIT=()
[[ ${TCSCALE_EVAL_WAIT:-0} == 1 ]] && WAIT=(--wait)
RC=0
# shellcheck disable=SC2086
MERGE=$(sbatch --parsable "${WAIT[@]}" --dependency="afterok:${ARRAY}" --kill-on-invalid-dep=yes \
    --job-name=tcscale-eval-merge --output=slurm-%x-%j.out ${TCSCALE_SBATCH_ARGS:-} \
    "$HERE/eval.sbatch" --merge "$@") || RC=$?
echo "array ${ARRAY} (${N} tasks), merge ${MERGE%%;*}"
exit "$RC"
