#!/bin/bash
# Summit-style LSF + jsrun batch script (IBM POWER9 nodes with 6 V100 GPUs each), as the paper
# ran: 24 nodes = 144 GPUs by default. An example for jsrun/LSF machines: Summit itself is retired
# and torch wheels for ppc64le come from the site's own (Open-CE) environment, not from PyPI.
#
#   cd <repository> && bsub launch/summit_jsrun.sh                               # 144 GPUs
#   cd <repository> && bsub -nnodes 576 -env "all, CONFIG=launch/presets/paper-enwik8-3456gpu.yaml" \
#       launch/summit_jsrun.sh                                                    # 3,456 GPUs
#
# Fill in the project (-P) below. Trainer arguments: EXTRA_ARGS="--steps 10 ..." (bsub -env) or
# arguments after the script name; they follow `--config $CONFIG`, so they override the preset.
#
# Environment (all optional):
#   CONFIG       the YAML preset (default launch/presets/paper-enwik8-144gpu.yaml)
#   LSS_ROOT     the repository (default: the submission folder, LS_SUBCWD)
#   PYTHON       the interpreter on the compute nodes (default: active venv, ./.venv, python3)
#   MASTER_PORT  default 20000 + (LSB_JOBID mod 20000)
#   OMP_NUM_THREADS  default 7 (42 usable cores per node / 6 tasks)
#
# Layout: one resource set per node holding all 6 GPUs, 6 tasks and 42 cores (-n NODES -r 1 -a 6
# -g 6 -c 42 -b packed:7). Every task sees the node's 6 GPUs and picks cuda:LOCAL_RANK, and NCCL
# can use NVLink between them. (Six 1-GPU resource sets per node would show each task one GPU as
# cuda:0 and hide the peers from each other.) jsrun places ranks in blocks, so ranks 6k..6k+5 share
# node k: a sequence group of N <= 6 stays on one node's NVLink.
#
# What each task gets (launch/env_from_scheduler.sh): RANK=OMPI_COMM_WORLD_RANK (or
# JSM_NAMESPACE_RANK, PMIX_RANK), WORLD_SIZE=OMPI_COMM_WORLD_SIZE (or JSM_NAMESPACE_SIZE),
# LOCAL_RANK=OMPI_COMM_WORLD_LOCAL_RANK (or JSM_NAMESPACE_LOCAL_RANK), MASTER_ADDR=the first
# compute host of the job (LSB_DJOB_HOSTFILE/LSB_HOSTS minus the batch/login launch node).
# --smpiargs="-disable_gpu_hooks": the trainer is not an MPI program, and Spectrum MPI's CUDA
# hooks otherwise abort a process that uses CUDA without MPI.
#
#BSUB -P PROJECT_ID
#BSUB -J lss-megatron
#BSUB -nnodes 24
#BSUB -W 2:00
#BSUB -alloc_flags smt4
#BSUB -o lss-megatron.%J.out
#BSUB -e lss-megatron.%J.err
# -h / --help: this header as usage, exit 0, nothing else
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -euo pipefail

ROOT="${LSS_ROOT:-${LS_SUBCWD:-$PWD}}"
if [ ! -f "$ROOT/launch/common.sh" ]; then
  echo "summit_jsrun.sh: error: $ROOT is not the lss-megatron repository: submit from its root" \
    "or set LSS_ROOT" >&2
  exit 2
fi
cd "$ROOT"
# shellcheck source=launch/common.sh
source launch/common.sh
PY="$(lss_python)"
CONFIG="${CONFIG:-launch/presets/paper-enwik8-144gpu.yaml}"
[ -f "$CONFIG" ] || lss_die "CONFIG=$CONFIG: no such file"
GPUS_PER_NODE=6
CORES_PER_NODE=42  # of the 44 POWER9 cores, 2 are reserved for the system

# The job's compute hosts in allocation order, without the launch node (batchN / loginN).
if [ -n "${LSB_DJOB_HOSTFILE:-}" ] && [ -r "$LSB_DJOB_HOSTFILE" ]; then
  host_list="$(cat "$LSB_DJOB_HOSTFILE")"
else
  host_list="$(printf '%s\n' ${LSB_HOSTS:-})"
fi
HOSTS="$(printf '%s\n' "$host_list" | awk 'NF && $1 !~ /^(batch|login)/ && !seen[$1]++ { print $1 }')"
NODES="$(printf '%s\n' "$HOSTS" | awk 'NF' | wc -l)"
[ "$NODES" -gt 0 ] || lss_die "no compute hosts in LSB_DJOB_HOSTFILE/LSB_HOSTS: run me with bsub"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((CORES_PER_NODE / GPUS_PER_NODE))}"
if [ -z "${MASTER_ADDR:-}" ]; then
  MASTER_ADDR="$(printf '%s\n' "$HOSTS" | awk 'NR == 1')"
  export MASTER_ADDR
fi
export MASTER_PORT="${MASTER_PORT:-$((20000 + ${LSB_JOBID:-9500} % 20000))}"
echo "summit_jsrun.sh: job ${LSB_JOBID:-?}, $NODES nodes x $GPUS_PER_NODE GPUs," \
  "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT, CONFIG=$CONFIG" >&2

# shellcheck disable=SC2086  # EXTRA_ARGS is a list of words
# The configuration is checked once, here, before any rank starts (exit 2, one message). Memory is
# checked by each rank on its compute node (this is the launch node).
# shellcheck disable=SC2086
lss_validate "$PY" "$((NODES * GPUS_PER_NODE))" "$GPUS_PER_NODE" --config "$CONFIG" \
  ${EXTRA_ARGS:-} "$@" --no-memory-check || exit $?

jsrun --smpiargs="-disable_gpu_hooks" \
  -n "$NODES" -r 1 -a "$GPUS_PER_NODE" -g "$GPUS_PER_NODE" -c "$CORES_PER_NODE" \
  -b "packed:$OMP_NUM_THREADS" -d packed \
  bash launch/env_from_scheduler.sh "$PY" -m lss_megatron.train --config "$CONFIG" \
  ${EXTRA_ARGS:-} "$@"
