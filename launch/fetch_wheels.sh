#!/usr/bin/env bash
# Fill launch/wheels/ with the wheels launch/gpu_check.sh installs on the GPU machine (Python
# 3.12, torch 2.11 preinstalled, no megatron-core, no network). Run it here (network or the
# local package mirror), then name launch/wheels in the GPU call's `carry` (about 20 MB):
#   bash launch/fetch_wheels.sh && ls launch/wheels
# Only what the check needs besides torch: megatron-core and its two requirements, and the
# trainer's pyyaml and tqdm (each installed there only if missing). DeepSpeed is not needed
# (the check runs serial and lss; ZeRO and Ulysses are not in it).
# -h / --help: this header as usage, exit 0, nothing else
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-$( [ -x ../.venv/bin/python ] && echo ../.venv/bin/python || echo python3 )}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d wheels \
  megatron-core==0.16.1 "numpy>=1.26" "packaging>=24.2" "pyyaml>=6.0" "tqdm>=4.66"
ls -la wheels
