#!/usr/bin/env bash
# The prepared GPU check (analysis/gpu_check.py): attention paths vs the math reference and the
# SDPA kernel that ran, bf16 matmul peak, LSS per-rank attention efficiency up to l/N = 64K, the
# trainer in serial and lss (N = 1) on the GPU; ONE JSON, DIR/gpu_check.json. Within 10 minutes.
#
#   bash launch/gpu_check.sh --out-dir DIR             # on the GPU machine (exit 0: all passed)
#   bash launch/gpu_check.sh --out-dir DIR --dry-run   # the same code on the CPU, toy sizes
#
# The GPU machine has Python 3.12 and torch 2.11 but no megatron-core and no network: what is
# missing is installed from launch/wheels/ (fill it here with `bash launch/fetch_wheels.sh`,
# and carry that folder to the GPU call) into .gpu_site/ on PYTHONPATH, without touching torch.
# Python: $PYTHON, else ./.venv/bin/python for --dry-run, else python3.
# -h / --help: this header as usage, exit 0, nothing else
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ "$dry" = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi

missing=()  # pip names of what this Python cannot import (the trainer's needs besides torch)
for pair in megatron.core:megatron-core==0.16.1 numpy:numpy packaging:packaging yaml:pyyaml \
            tqdm:tqdm; do
  "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ ! -d launch/wheels ]; then
    echo "gpu_check.sh: error: $PY lacks ${missing[*]} and there is no launch/wheels/ to" \
         "install them from (bash launch/fetch_wheels.sh, then carry launch/wheels)" >&2
    exit 2
  fi
  echo "gpu_check.sh: installing ${missing[*]} from launch/wheels/ into .gpu_site/" >&2
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install --isolated --quiet --no-index --find-links launch/wheels --no-deps \
      --target .gpu_site "${missing[@]}"
  else  # no pip: a wheel is a zip of what goes into site-packages
    for name in "${missing[@]}"; do
      stem="$(printf '%s' "${name%%[=<>]*}" | tr - _)"
      "$PY" -c "import glob, sys, zipfile; w = glob.glob('launch/wheels/' + sys.argv[1] + '-*.whl')
if not w: sys.exit('gpu_check.sh: error: no wheel for ' + sys.argv[1] + ' in launch/wheels/')
zipfile.ZipFile(w[0]).extractall('.gpu_site')" "$stem"
    done
  fi
  export PYTHONPATH="$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" -m analysis.gpu_check "$@"
