#!/usr/bin/env bash
# Fill launch/wheels/ with what launch/gpu_check.sh installs on the GPU machine (Python 3.12,
# torch 2.11 preinstalled, no megatron-core, no deepspeed, no network). Run it here (network to
# PyPI), then name launch/wheels in the GPU call's `carry` (docs/measurement.md):
#   bash launch/fetch_wheels.sh && ls launch/wheels
# * megatron-core 0.16.1 (a wheel, its requirements below);
# * deepspeed 0.19.8: PyPI has only its source; it is built here into a pure-Python wheel
#   (DS_BUILD_OPS=0: nothing compiled; Ulysses and ZeRO need no compiled op);
# * every requirement of the two and of the trainer except torch, with THEIR requirements, as
#   cp312 manylinux wheels: numpy, packaging, pyyaml, tqdm, einops, hjson, msgpack, ninja, psutil,
#   py-cpuinfo, pydantic (+ pydantic-core, annotated-types, typing-extensions,
#   typing-inspection). gpu_check.sh installs a wheel only where the GPU's Python lacks that
#   distribution or has an older version, into .gpu_site/ (torch untouched).
# -h / --help: this header as usage, exit 0, nothing else
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-$( [ -x ../.venv/bin/python ] && echo ../.venv/bin/python || echo python3 )}"
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3
        --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64
        --platform manylinux1_x86_64 --platform any)
mkdir -p wheels
"$PY" -m pip download --quiet --no-deps "${TARGET[@]}" -d wheels megatron-core==0.16.1
# with their requirements (none of these needs torch)
"$PY" -m pip download --quiet "${TARGET[@]}" -d wheels "numpy>=1.26" "packaging>=24.2" \
  "pyyaml>=6.0" "tqdm>=4.66" einops hjson msgpack ninja psutil py-cpuinfo "pydantic>=2.0"
if ! ls wheels/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  # the source's setup.py imports torch: build without isolation, in this Python (torch here)
  DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w wheels \
    deepspeed==0.19.8
fi
ls -la wheels
