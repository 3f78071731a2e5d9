#!/usr/bin/env bash
# All GPU checks in one command, for sessions lent a GPU (see analysis/gpu_check.py):
# measured bf16 matmul peak, LSS per-rank attention and one realistic layer step at l up to 64K,
# written to analysis/data/gpu/<device>.json (commit that file: the cost model reads it).
#   bash launch/gpu_check.sh [--seq-parallel N]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PY" -m analysis.gpu_check --device cuda "$@"
