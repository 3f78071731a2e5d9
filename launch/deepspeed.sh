#!/usr/bin/env bash
# Run the trainer (python -m lss_megatron.train) under the DeepSpeed launcher.
#
#   bash launch/deepspeed.sh --num-gpus N [--num-nodes K] [--hostfile FILE] [--include SPEC]
#                            [--master-port PORT] [--master-addr ADDR] [--dry-run]
#                            [--deepspeed_option[=VALUE] ...] -- TRAINER ARGS...
#
# Examples:
#   bash launch/deepspeed.sh --num-gpus 4 -- --mode lss --seq-parallel 4
#   bash launch/deepspeed.sh --num-gpus 2 -- --config launch/presets/tiny-cpu.yaml --steps 3
#   bash launch/deepspeed.sh --hostfile hosts.txt --num-gpus 6 -- --config my.yaml   # multi-node
#
# Everything after `--` goes to the trainer. Before `--`:
#   --num-gpus N        processes per node (DeepSpeed's --num_gpus). On a CPU-only machine each
#                       process is one CPU "device"; without this DeepSpeed starts one process per
#                       NUMA node there, or one per GPU on a GPU machine.
#   --num-nodes K       use the first K hosts of the hostfile.
#   --hostfile FILE     MPI-style hostfile ("worker-0 slots=6" per line): multi-node via pdsh/ssh;
#                       every host needs passwordless ssh (also to itself), pdsh, the same
#                       repository path and Python environment. DeepSpeed also reads
#                       /job/hostfile when it exists and no --hostfile is given.
#   --include SPEC      e.g. localhost:0,1 or worker-0:0,2@worker-1 (exclusive with --num-gpus).
#                       On CPU, DeepSpeed counts local devices from LOCAL_SIZE; this script sets
#                       LOCAL_SIZE to the highest slot + 1 when it is not set.
#   --exclude SPEC      the complement of --include.
#   --master-port PORT  rendezvous port. Default: a free port on this host for single-node runs
#                       (DeepSpeed's own default, 29500, collides between concurrent launches);
#                       DeepSpeed's 29500 with a hostfile (pass one the first host has free).
#   --master-addr ADDR  rendezvous address (single node: 127.0.0.1; hostfile: the first host's
#                       `hostname -I`, found over ssh).
#   --dry-run           print the command and the environment it would set, run nothing.
#   -h, --help          this text.
#   --other_option[=V]  any other DeepSpeed launcher option, spelled as DeepSpeed spells it (with
#                       underscores, values after `=`): passed through unchanged, e.g.
#                       --bind_cores_to_rank, --launcher=openmpi, --enable_each_rank_log=logs.
#
# On one node, with --num-gpus or --include HOST:SLOTS, the trainer checks the configuration once
# (--validate-only) before any rank starts: a bad one is one message and exit status 2.
# Environment: OMP_NUM_THREADS defaults to 1 (DeepSpeed sets none, unlike torchrun, unless
# --bind_cores_to_rank); PYTHON picks the interpreter (default: active venv, else ./.venv, else
# python3), which must have deepspeed installed. DeepSpeed passes --local_rank=I to every process;
# the trainer accepts it. On multi-node runs only PYTHON*, NCCL*, UCX*, MV2* and MLFLOW* variables
# reach the other hosts: put OMP_NUM_THREADS=... in ./.deepspeed_env or ~/.deepspeed_env.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

num_gpus="" num_nodes="" hostfile="" include="" exclude="" master_port="" master_addr=""
dry_run=0
passthrough=()
need() { [ $# -ge 2 ] && [ -n "$2" ] || lss_die "$1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    --num-gpus | --num_gpus) need "$@"; num_gpus="$2"; shift 2 ;;
    --num-gpus=* | --num_gpus=*) num_gpus="${1#*=}"; shift ;;
    --num-nodes | --num_nodes) need "$@"; num_nodes="$2"; shift 2 ;;
    --num-nodes=* | --num_nodes=*) num_nodes="${1#*=}"; shift ;;
    --hostfile | -H) need "$@"; hostfile="$2"; shift 2 ;;
    --hostfile=*) hostfile="${1#*=}"; shift ;;
    --include | -i) need "$@"; include="$2"; shift 2 ;;
    --include=*) include="${1#*=}"; shift ;;
    --exclude | -e) need "$@"; exclude="$2"; shift 2 ;;
    --exclude=*) exclude="${1#*=}"; shift ;;
    --master-port | --master_port) need "$@"; master_port="$2"; shift 2 ;;
    --master-port=* | --master_port=*) master_port="${1#*=}"; shift ;;
    --master-addr | --master_addr) need "$@"; master_addr="$2"; shift 2 ;;
    --master-addr=* | --master_addr=*) master_addr="${1#*=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    --*_*) passthrough+=("$1"); shift ;;  # DeepSpeed's own spelling: pass it on
    -*) lss_die "unknown option $1: trainer arguments go after --; other DeepSpeed options use DeepSpeed's spelling (--bind_cores_to_rank, --launcher=openmpi)" ;;
    *) lss_die "unexpected argument '$1': trainer arguments go after -- (see --help)" ;;
  esac
done

for v in num_gpus num_nodes master_port; do
  val="${!v}"
  [ -z "$val" ] || [[ "$val" =~ ^[0-9]+$ ]] || lss_die "--${v//_/-} must be a number, got '$val'"
done
if [ -n "$num_gpus$num_nodes" ] && [ -n "$include$exclude" ]; then
  lss_die "--num-gpus/--num-nodes and --include/--exclude exclude each other (DeepSpeed's rule)"
fi
[ -z "$hostfile" ] || [ -f "$hostfile" ] || lss_die "--hostfile $hostfile: no such file"

PY="$(lss_python)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# On CPU, DeepSpeed sizes the local resource pool from LOCAL_SIZE (else: NUMA nodes, often 1),
# so `--include localhost:0,1` fails without it. Harmless on GPUs (they are counted by CUDA).
if [ -n "$include" ] && [ -z "${LOCAL_SIZE:-}" ]; then
  max_slot="$(printf '%s\n' "$include" | tr '@' '\n' | sed -n 's/^[^:]*://p' | tr ',' '\n' |
    grep -E '^[0-9]+$' | sort -n | tail -n 1 || true)"
  [ -z "$max_slot" ] || export LOCAL_SIZE=$((max_slot + 1))
fi

multi_node=0
if [ -n "$hostfile" ] || { [ -z "${hostfile}" ] && [ -f /job/hostfile ]; }; then multi_node=1; fi
if [ -z "$master_port" ] && [ "$multi_node" = 0 ]; then
  master_port="$(lss_free_port "$PY")"
fi

cmd=("$PY" -m deepspeed.launcher.runner)  # what the `deepspeed` command runs, on this Python
[ -z "$hostfile" ] || cmd+=(--hostfile "$hostfile")
[ -z "$num_nodes" ] || cmd+=(--num_nodes "$num_nodes")
[ -z "$num_gpus" ] || cmd+=(--num_gpus "$num_gpus")
[ -z "$include" ] || cmd+=(--include "$include")
[ -z "$exclude" ] || cmd+=(--exclude "$exclude")
[ -z "$master_port" ] || cmd+=(--master_port "$master_port")
[ -z "$master_addr" ] || cmd+=(--master_addr "$master_addr")
cmd+=("${passthrough[@]}" --module lss_megatron.train "$@")

{
  printf 'deepspeed.sh: OMP_NUM_THREADS=%s%s PYTHONPATH=%s\n' "$OMP_NUM_THREADS" \
    "${LOCAL_SIZE:+ LOCAL_SIZE=$LOCAL_SIZE}" "$PYTHONPATH"
  printf 'deepspeed.sh:'
  printf ' %q' "${cmd[@]}"
  printf '\n'
} >&2
[ "$dry_run" = 0 ] || exit 0
"$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("deepspeed") is None)' ||
  lss_die "$PY has no deepspeed: run launch/setup_env.sh, or set PYTHON to a Python that has it"
# validate once before any rank starts, where this host knows the world size (single node)
world=""
if [ "$multi_node" = 0 ] && [ -z "$exclude" ]; then
  if [ -n "$include" ] && [[ "$include" != *@* ]] && [[ "$include" == *:* ]]; then
    world="$(printf '%s\n' "${include#*:}" | tr ',' '\n' | grep -c .)"
  elif [ -z "$include" ] && [ -n "$num_gpus" ]; then
    world="$num_gpus"
  fi
fi
if [ -n "$world" ]; then
  lss_validate "$PY" "$world" "$world" "$@" || exit $?
fi
exec "${cmd[@]}"
