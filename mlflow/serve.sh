#!/usr/bin/env bash
# Start the project's MLflow tracking server (UI + REST API + model registry) on 127.0.0.1.
#
#   mlflow/serve.sh                      # or: make mlflow-server
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000    # then every milora step logs to it
#
# Settings (environment variables, all optional):
#   MLFLOW_PORT                    port (default 5000)
#   MLFLOW_HOST                    interface (default 127.0.0.1: local only)
#   MLFLOW_BACKEND_STORE_URI       SQLite backend (default sqlite:///<project>/mlflow/mlflow.db, the same
#                                  store the pipeline uses when MLFLOW_TRACKING_URI is unset)
#   MLFLOW_ARTIFACTS_DESTINATION   where artifacts go, proxied through the server: a local directory
#                                  (default <project>/mlflow/artifacts) or s3://bucket/prefix, read and
#                                  written by the server with boto3 (AWS_* credentials or an AWS profile;
#                                  MLFLOW_S3_ENDPOINT_URL for an S3-compatible store such as MinIO)
#   MLFLOW_WORKERS                 server worker processes (default 2)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION
#                                  MLflow's job runner (huey consumers for its GenAI jobs: scorers, trace
#                                  rollups); default false here: the pipeline starts no MLflow jobs, and the
#                                  runner is 8 more processes (~15 s of CPU at start, ~0.4 GiB). Set true if
#                                  other MLflow users of this server need it.
#
# Credentials are taken from the environment by boto3 and never printed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT="${MLFLOW_PORT:-5000}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///${ROOT}/mlflow/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-${ROOT}/mlflow/artifacts}"
WORKERS="${MLFLOW_WORKERS:-2}"

if [[ -x "${ROOT}/.venv/bin/mlflow" ]]; then
  MLFLOW="${ROOT}/.venv/bin/mlflow"
elif command -v mlflow >/dev/null 2>&1; then
  MLFLOW="$(command -v mlflow)"
else
  echo "mlflow/serve.sh: no mlflow executable: run 'make setup' (or pip install mlflow)" >&2
  exit 2
fi

case "${BACKEND}" in
  sqlite:///*) mkdir -p "$(dirname "${BACKEND#sqlite:///}")" ;;
esac
case "${ARTIFACTS}" in
  s3://*)
    if [[ -n "${MLFLOW_S3_ENDPOINT_URL:-}" ]]; then
      echo "mlflow/serve.sh: artifacts in ${ARTIFACTS} via ${MLFLOW_S3_ENDPOINT_URL}" >&2
    else
      echo "mlflow/serve.sh: artifacts in ${ARTIFACTS} (AWS S3)" >&2
    fi ;;
  *://*) echo "mlflow/serve.sh: artifacts in ${ARTIFACTS}" >&2 ;;
  *) mkdir -p "${ARTIFACTS}"; ARTIFACTS="$(cd "${ARTIFACTS}" && pwd)"
     echo "mlflow/serve.sh: artifacts in ${ARTIFACTS}" >&2 ;;
esac
echo "mlflow/serve.sh: backend ${BACKEND}; serving on http://${HOST}:${PORT}" >&2

export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="${MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR:-false}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
exec "${MLFLOW}" server \
  --host "${HOST}" --port "${PORT}" --workers "${WORKERS}" \
  --backend-store-uri "${BACKEND}" \
  --serve-artifacts --artifacts-destination "${ARTIFACTS}"
