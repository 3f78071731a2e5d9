#!/usr/bin/env bash
# Translate a batch scheduler's per-task variables into the five the trainer reads (env://
# rendezvous): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
#
#   source launch/env_from_scheduler.sh            # export them into this shell
#   bash launch/env_from_scheduler.sh CMD ARGS...  # export them, then exec CMD (one per task)
#   bash launch/env_from_scheduler.sh              # print them (debugging: srun bash ...)
#
# Used by launch/slurm.sbatch and launch/summit_jsrun.sh as the per-task wrapper:
#   srun  bash launch/env_from_scheduler.sh python -m lss_megatron.train --config ...
#   jsrun ... bash launch/env_from_scheduler.sh python -m lss_megatron.train --config ...
#
# Where each value comes from (first one set wins; LSS_SCHEDULER=slurm|mpi forces a branch):
#   MPI launchers (jsrun / Spectrum MPI, mpirun): checked first, since an mpirun inside a SLURM
#     job inherits the batch step's SLURM_PROCID=0 on every rank.
#     RANK        OMPI_COMM_WORLD_RANK, JSM_NAMESPACE_RANK, PMIX_RANK, PMI_RANK
#     WORLD_SIZE  OMPI_COMM_WORLD_SIZE, JSM_NAMESPACE_SIZE, PMI_SIZE
#     LOCAL_RANK  OMPI_COMM_WORLD_LOCAL_RANK, JSM_NAMESPACE_LOCAL_RANK, MPI_LOCALRANKID
#     MASTER_ADDR the first compute host of the LSF job: LSB_DJOB_HOSTFILE, else LSB_HOSTS, else
#                 LSB_MCPU_HOSTS, in allocation order, skipping the launch node (batch*/login*
#                 names, as on Summit); else the first host of SLURM_JOB_NODELIST
#   SLURM (srun):
#     RANK SLURM_PROCID, WORLD_SIZE SLURM_NTASKS (or SLURM_NPROCS), LOCAL_RANK SLURM_LOCALID,
#     MASTER_ADDR the first host of `scontrol show hostnames "$SLURM_JOB_NODELIST"`
#   MASTER_PORT 20000 + (job id mod 20000), job id LSB_JOBID or SLURM_JOB_ID: the same on every
#     task, different for concurrent jobs. Default 29500 when there is no job id.
# MASTER_ADDR and MASTER_PORT already in the environment are kept (the batch scripts compute
# them once, so thousands of tasks do not each query the scheduler). RANK, WORLD_SIZE and
# LOCAL_RANK always come from the scheduler's per-task variables.
#
# Global rank r must run on the host named by MASTER_ADDR for r = 0: true for srun's and jsrun's
# default (block) task placement; set MASTER_ADDR yourself for anything else.
# run (not sourced) with -h / --help: this header as usage, exit 0, nothing else
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  case "${1:-}" in -h | --help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
fi

_lss_env_err() { echo "env_from_scheduler.sh: error: $*" >&2; }

_lss_first_set() {  # print the value of the first named variable that is set and non-empty
  local name
  for name in "$@"; do
    if [ -n "${!name:-}" ]; then
      printf '%s\n' "${!name}"
      return 0
    fi
  done
  return 1
}

_lss_lsf_first_host() {  # first compute host of an LSF job, in allocation order
  local hosts=""
  if [ -n "${LSB_DJOB_HOSTFILE:-}" ] && [ -r "${LSB_DJOB_HOSTFILE}" ]; then
    hosts="$(cat "$LSB_DJOB_HOSTFILE")"
  elif [ -n "${LSB_HOSTS:-}" ]; then
    hosts="$(printf '%s\n' $LSB_HOSTS)"
  elif [ -n "${LSB_MCPU_HOSTS:-}" ]; then  # "host1 n1 host2 n2 ..."
    hosts="$(printf '%s\n' $LSB_MCPU_HOSTS | awk 'NR % 2 == 1')"
  fi
  printf '%s\n' "$hosts" | awk 'NF && $1 !~ /^(batch|login)/ { print $1; exit }'
}

_lss_slurm_first_host() {
  [ -n "${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}" ] || return 0
  # awk, not head: head would close the pipe early and fail scontrol under pipefail
  scontrol show hostnames "${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}" | awk 'NR == 1'
}

_lss_env_from_scheduler() {
  local kind="${LSS_SCHEDULER:-}" rank size local_rank addr job
  if [ -z "$kind" ]; then
    if _lss_first_set OMPI_COMM_WORLD_RANK JSM_NAMESPACE_RANK >/dev/null; then
      kind=mpi
    elif [ -n "${SLURM_PROCID:-}" ]; then
      kind=slurm
    elif _lss_first_set PMIX_RANK PMI_RANK >/dev/null; then
      kind=mpi
    else
      _lss_env_err "no scheduler task variables found (SLURM_PROCID, OMPI_COMM_WORLD_RANK," \
        "JSM_NAMESPACE_RANK, PMIX_RANK, PMI_RANK): run me under srun, jsrun or mpirun"
      return 1
    fi
  fi
  case "$kind" in
    slurm)
      rank="${SLURM_PROCID:-}"
      size="$(_lss_first_set SLURM_NTASKS SLURM_NPROCS)"
      local_rank="${SLURM_LOCALID:-}"
      ;;
    mpi)
      rank="$(_lss_first_set OMPI_COMM_WORLD_RANK JSM_NAMESPACE_RANK PMIX_RANK PMI_RANK)"
      size="$(_lss_first_set OMPI_COMM_WORLD_SIZE JSM_NAMESPACE_SIZE PMI_SIZE)"
      local_rank="$(_lss_first_set OMPI_COMM_WORLD_LOCAL_RANK JSM_NAMESPACE_LOCAL_RANK \
        MPI_LOCALRANKID)"
      ;;
    *)
      _lss_env_err "LSS_SCHEDULER must be slurm or mpi, got '$kind'"
      return 1
      ;;
  esac
  local v
  for v in rank size local_rank; do
    if ! [[ "${!v:-}" =~ ^[0-9]+$ ]]; then
      _lss_env_err "could not read ${v} from the $kind task variables (got '${!v:-}')"
      return 1
    fi
  done
  if [ "$rank" -ge "$size" ]; then
    _lss_env_err "rank $rank is not below the world size $size"
    return 1
  fi

  addr="${MASTER_ADDR:-}"
  if [ -z "$addr" ]; then
    if [ "$kind" = mpi ]; then addr="$(_lss_lsf_first_host)"; fi
    if [ -z "$addr" ]; then addr="$(_lss_slurm_first_host)"; fi
    if [ -z "$addr" ]; then
      _lss_env_err "cannot tell the rank-0 host: set MASTER_ADDR (no LSB_* host list and no" \
        "SLURM_JOB_NODELIST)"
      return 1
    fi
  fi
  job="$(_lss_first_set LSB_JOBID SLURM_JOB_ID SLURM_JOBID || true)"
  export RANK="$rank" WORLD_SIZE="$size" LOCAL_RANK="$local_rank" MASTER_ADDR="$addr"
  if [ -z "${MASTER_PORT:-}" ]; then
    if [[ "$job" =~ ^[0-9]+$ ]]; then
      export MASTER_PORT=$((20000 + job % 20000))
    else
      export MASTER_PORT=29500
    fi
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # executed, not sourced
  set -euo pipefail
  _lss_env_from_scheduler || exit 2
  if [ $# -eq 0 ]; then
    printf 'RANK=%s\nWORLD_SIZE=%s\nLOCAL_RANK=%s\nMASTER_ADDR=%s\nMASTER_PORT=%s\n' \
      "$RANK" "$WORLD_SIZE" "$LOCAL_RANK" "$MASTER_ADDR" "$MASTER_PORT"
    exit 0
  fi
  exec "$@"
else
  _lss_env_from_scheduler
fi
