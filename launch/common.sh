# shellcheck shell=bash
# Helpers sourced by the launcher scripts in this folder (not run on its own).
#
#   LSS_ROOT       the repository root (default: the folder above this file)
#   lss_python     the Python interpreter to run: $PYTHON if set, else the active virtualenv's,
#                  else the repository's ./.venv (launch/setup_env.sh), else python3 on PATH
#   lss_free_port  a TCP port that was free on this host a moment ago
#   lss_die        print "SCRIPT: error: MESSAGE" to stderr and exit 2
#   lss_validate   run the trainer's --validate-only once for the whole job (before any rank)
# run on its own with -h / --help: this header as usage, exit 0 (sourced: nothing happens)
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  case "${1:-}" in -h | --help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
fi

LSS_ROOT="${LSS_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"

lss_python() {
  if [ -n "${PYTHON:-}" ]; then
    printf '%s\n' "$PYTHON"
  elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    printf '%s\n' "$VIRTUAL_ENV/bin/python"
  elif [ -x "$LSS_ROOT/.venv/bin/python" ]; then
    printf '%s\n' "$LSS_ROOT/.venv/bin/python"
  elif command -v python3 >/dev/null 2>&1; then
    command -v python3
  else
    command -v python
  fi
}

# Bind port 0 and report what the kernel chose. Another process can take it before the launcher
# binds it (rare); rerun, or pass an explicit port, if a launch fails with "address in use".
lss_free_port() {
  "$1" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1]); s.close()'
}

lss_die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# lss_validate PY P LOCAL TRAINER_ARGS...: check the trainer's configuration, folders and memory
# estimate once, here, for P processes (LOCAL of them on this host), before any rank starts, so a
# bad configuration is one message and exit status 2 instead of one per rank. Its summary line
# goes to stderr beside the launch command.
lss_validate() {
  local py="$1" world="$2" local_ranks="$3"
  shift 3
  WORLD_SIZE="$world" RANK=0 LOCAL_RANK=0 LOCAL_WORLD_SIZE="$local_ranks" \
    "$py" -m lss_megatron.train --validate-only "$@" >&2
}

# make `python -m lss_megatron.train` importable from any working directory, installed or not
export PYTHONPATH="$LSS_ROOT${PYTHONPATH:+:$PYTHONPATH}"
