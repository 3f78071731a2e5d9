# shellcheck shell=bash
# Helpers sourced by the launcher scripts in this folder (not run on its own).
#
#   LSS_ROOT       the repository root (default: the folder above this file)
#   lss_python     the Python interpreter to run: $PYTHON if set, else the active virtualenv's,
#                  else the repository's ./.venv (launch/setup_env.sh), else python3 on PATH
#   lss_free_port  a TCP port that was free on this host a moment ago
#   lss_die        print "SCRIPT: error: MESSAGE" to stderr and exit 2

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

# make `python -m lss_megatron.train` importable from any working directory, installed or not
export PYTHONPATH="$LSS_ROOT${PYTHONPATH:+:$PYTHONPATH}"
