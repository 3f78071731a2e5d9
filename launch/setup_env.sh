#!/usr/bin/env bash
# Create ./.venv and install lss-megatron with its pinned dependencies (CPU-safe).
# Idempotent: a second run with unchanged requirements only checks a stamp file.
#   PYTHON=python3.11 bash launch/setup_env.sh
# -h / --help: this header as usage, exit 0, nothing else
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
fi
VENV="${VENV:-.venv}"
STAMP="$VENV/.lss-installed"
WANT="$(cat requirements.txt pyproject.toml setup.py | sha256sum | cut -d' ' -f1)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# torch first and exactly pinned: anything looser pulls a multi-GB CUDA build on CPU machines
"${PIP[@]}" "torch==2.13.0"
# deepspeed builds no C++/CUDA ops at install time (they JIT-compile if ever used)
DS_BUILD_OPS=0 "${PIP[@]}" -r requirements.txt
"${PIP[@]}" --no-deps -e .
echo "$WANT" > "$STAMP"
echo "setup_env: $("$VENV/bin/python" -c 'import torch, megatron.core, deepspeed; print("torch", torch.__version__, "| megatron-core", megatron.core.__version__, "| deepspeed", deepspeed.__version__)' 2>/dev/null)"
