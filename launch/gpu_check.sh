#!/usr/bin/env bash
# The prepared GPU check (analysis/gpu_check.py; docs/measurement.md, "The GPU check"): a
# single-rank NCCL all-reduce first, the attention paths vs the math reference with the SDPA
# kernel pinned (flash first), the bf16 matmul peak, LSS per-rank attention efficiency, every
# mode's per-rank layer work at one equal layout (P = 8), the trainer in serial and lss (N = 1);
# ONE JSON, DIR/gpu_check.json, with the planned and the measured seconds of every phase.
#
#   bash launch/gpu_check.sh --out-dir DIR [--overwrite]   # on the GPU machine (exit 0: passed)
#   bash launch/gpu_check.sh --out-dir DIR --dry-run       # the same code on the CPU, toy sizes
#
# The GPU machine has Python 3.12 and torch 2.11 but no megatron-core, no deepspeed and no
# network: launch/wheels/ (fill it here with `bash launch/fetch_wheels.sh`, carry it to the GPU
# call) holds them and their requirements; a wheel is installed into .gpu_site/ on PYTHONPATH
# only where this Python lacks its distribution or has an older version (torch untouched).
# Python: $PYTHON, else ./.venv/bin/python for --dry-run, else python3.
# -h / --help: this header as usage, exit 0, nothing else
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -euo pipefail
export GPU_CHECK_T0="${GPU_CHECK_T0:-$(date +%s.%N)}"  # the check counts its setup from here
cd "$(dirname "$0")/.."
dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ "$dry" = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi

needed=(megatron.core deepspeed numpy packaging yaml tqdm pydantic)  # what the check imports
lacking=()  # found without importing them (find_spec)
mapfile -t lacking < <("$PY" -c "import importlib.util as u, sys
for m in sys.argv[1:]:
    try:
        found = u.find_spec(m) is not None
    except ImportError:
        found = False
    if not found:
        print(m)" "${needed[@]}")
if [ "${#lacking[@]}" -gt 0 ]; then
  if ! ls launch/wheels/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: error: $PY cannot import ${lacking[*]} and launch/wheels/ has no wheels" \
         "to install (bash launch/fetch_wheels.sh here, then carry launch/wheels)" >&2
    exit 2
  fi
  # the wheels whose distribution this Python lacks or has in an older version
  mapfile -t wheels < <("$PY" - <<'PYEOF'
import glob, re
from importlib.metadata import PackageNotFoundError, version

def key(v):
    return [int(x) for x in re.findall(r"\d+", v.split("+")[0])[:4]]

for w in sorted(glob.glob("launch/wheels/*.whl")):
    name, ver = w.rsplit("/", 1)[1].split("-")[:2]
    try:
        have = version(name.replace("_", "-"))
    except PackageNotFoundError:
        have = None
    if have is None or key(have) < key(ver):
        print(w)
PYEOF
  )
  echo "gpu_check.sh: installing ${#wheels[@]} wheels into .gpu_site/:" \
       "$(printf '%s ' "${wheels[@]##*/}")" >&2
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install --isolated --quiet --no-index --no-deps --target .gpu_site "${wheels[@]}"
  else  # no pip: a wheel is a zip of what goes into site-packages
    for w in "${wheels[@]}"; do
      "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall('.gpu_site')" "$w"
    done
  fi
  export PYTHONPATH="$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"
  for mod in "${lacking[@]}"; do
    "$PY" -c "import $mod" 2>/dev/null || {
      echo "gpu_check.sh: error: $mod still cannot be imported after installing launch/wheels" >&2
      exit 2
    }
  done
fi
[ "$dry" = 1 ] || export DS_ACCELERATOR="${DS_ACCELERATOR:-cuda}"  # DeepSpeed: no probing
exec "$PY" -m analysis.gpu_check "$@"
