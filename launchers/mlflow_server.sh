#!/bin/bash
# One MLflow tracking server for a lab: every training run and evaluation logs to it through
# MLFLOW_TRACKING_URI=http://HOST:PORT (no config change: tcscale reads the variable when tracking.uri is null).
# Runs, params and metrics go to a database; artifacts (validation images, heatmaps, results.json, sample grids)
# to an artifact root that the server itself serves (--serve-artifacts), so clients need no access to its disk.
#
#   launchers/mlflow_server.sh [--root DIR] [--host ADDR] [--port N] [--backend-store-uri URI]
#                              [--artifacts-destination DIR_OR_URI] [--workers N] [-- more `mlflow server` flags]
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000       # on every client (sbatch passes the environment on)
#
# Defaults: --root $TCSCALE_MLFLOW_ROOT or ./mlflow-server; database sqlite:///<root>/mlflow.db (one file, fine for
# a lab's tracking traffic on a local disk; not on NFS); artifacts <root>/artifacts; --port 5000; --workers 2.
#
# Network: bound to 127.0.0.1 by default, so only this machine (or an ssh tunnel: ssh -L 5000:127.0.0.1:5000 host)
# reaches it. --host 0.0.0.0 widens it to every interface (compute nodes logging to a login or service node); then
# also name the host names clients use, --allowed-hosts 'mlflow.lab.example,10.1.*' (MLflow refuses other Host
# headers), and put authentication in front (a reverse proxy, or `-- --app-name basic-auth`): the server has none.
#
# PostgreSQL instead of sqlite (several writers, a database on another machine):
#   pip install psycopg2-binary
#   createdb mlflow     # as a PostgreSQL user that owns it
#   launchers/mlflow_server.sh --backend-store-uri postgresql://mlflow:PASSWORD@db.lab.example:5432/mlflow
# (keep the password out of shell history: a ~/.pgpass file and postgresql://mlflow@db.lab.example/mlflow).
#
# The script execs `mlflow server`, which starts worker processes: stop the whole process group (setsid it, then
# kill -TERM -- -PGID), or its workers outlive it. MLFLOW_SERVER_ENABLE_JOB_EXECUTION defaults to false here (no
# job-runner children). TCSCALE_PYTHON picks the interpreter [.venv/bin/python if present, else python].
set -euo pipefail

ROOT=${TCSCALE_MLFLOW_ROOT:-mlflow-server}
HOST=127.0.0.1
PORT=5000
WORKERS=2
BACKEND=
ARTIFACTS=
EXTRA=()
while [[ $# -gt 0 ]]; do
    case $1 in
    --root) ROOT=$2; shift 2 ;;
    --host) HOST=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --backend-store-uri) BACKEND=$2; shift 2 ;;
    --artifacts-destination) ARTIFACTS=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h | --help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "mlflow_server.sh: unknown option $1 (pass mlflow server's own flags after --)" >&2; exit 2 ;;
    esac
done

mkdir -p "$ROOT"
ROOT=$(cd "$ROOT" && pwd)
BACKEND=${BACKEND:-sqlite:///$ROOT/mlflow.db}
ARTIFACTS=${ARTIFACTS:-$ROOT/artifacts}
[[ $ARTIFACTS == *://* ]] || mkdir -p "$ARTIFACTS"

PYTHON=${TCSCALE_PYTHON:-}
if [[ -z $PYTHON ]]; then
    HERE=$(cd "$(dirname "$0")/.." && pwd)
    if [[ -x $HERE/.venv/bin/python ]]; then PYTHON=$HERE/.venv/bin/python; else PYTHON=python; fi
fi
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

echo "[mlflow_server.sh] http://$HOST:$PORT  database ${BACKEND%%:*}:...  artifacts $ARTIFACTS" >&2
exec "$PYTHON" -m mlflow server --host "$HOST" --port "$PORT" --workers "$WORKERS" \
    --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" --serve-artifacts "${EXTRA[@]}"
