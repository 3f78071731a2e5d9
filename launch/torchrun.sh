#!/usr/bin/env bash
# Run the trainer (python -m lss_megatron.train) under torchrun, on one node or several.
#
#   bash launch/torchrun.sh --nproc-per-node P [--dry-run] -- TRAINER ARGS...            # one node
#   bash launch/torchrun.sh --nproc-per-node P --nnodes K --node-rank R \
#                           --rdzv-endpoint HOST:PORT -- TRAINER ARGS...                 # K nodes
#   bash launch/torchrun.sh --nproc-per-node P --nnodes K [--rdzv-id ID] \
#                           --rdzv-endpoint HOST:PORT -- TRAINER ARGS...                 # elastic
#
# Examples:
#   bash launch/torchrun.sh --nproc-per-node 4 -- --mode lss --seq-parallel 4
#   bash launch/torchrun.sh --nproc-per-node 2 -- --config launch/presets/tiny-cpu.yaml
#
# Everything after `--` goes to the trainer. Before `--`:
#   --nproc-per-node P      processes on this node (one per GPU; on CPU one per CPU "device").
#   --nnodes K              nodes; K > 1 needs --rdzv-endpoint and the same command on every node.
#   --node-rank R           this node's index 0..K-1. Given: static rendezvous, node R's processes
#                           get global ranks R*P .. R*P+P-1 (node 0 hosts HOST:PORT). Not given:
#                           c10d rendezvous, torchrun numbers the nodes itself.
#   --rdzv-endpoint H:PORT  node 0's address and a port free there.
#   --rdzv-id ID            job id shared by the nodes (c10d only; default lss-megatron).
#   --dry-run               print the command, run nothing (no validation either).
#   -h, --help              this text.
#   --other-option[=V]      any other torchrun option (e.g. --max-restarts=0, --log-dir=logs),
#                           values after `=`: passed through unchanged.
#
# Before starting ranks the trainer checks the configuration once (--validate-only, exit 2 and
# one message when it is bad). One node uses `--standalone`: torchrun picks a free port itself, so concurrent launches do not
# collide. torchrun sets OMP_NUM_THREADS=1 when it is unset. PYTHON picks the interpreter
# (default: active venv, else ./.venv, else python3). Ranks are contiguous per node, so the N
# ranks of a sequence group (consecutive ranks) stay inside a node when N divides P.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

nproc="" nnodes="" node_rank="" endpoint="" rdzv_id="lss-megatron" dry_run=0
passthrough=()
need() { [ $# -ge 2 ] && [ -n "$2" ] || lss_die "$1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    --nproc-per-node | --nproc_per_node) need "$@"; nproc="$2"; shift 2 ;;
    --nproc-per-node=* | --nproc_per_node=*) nproc="${1#*=}"; shift ;;
    --nnodes) need "$@"; nnodes="$2"; shift 2 ;;
    --nnodes=*) nnodes="${1#*=}"; shift ;;
    --node-rank | --node_rank) need "$@"; node_rank="$2"; shift 2 ;;
    --node-rank=* | --node_rank=*) node_rank="${1#*=}"; shift ;;
    --rdzv-endpoint | --rdzv_endpoint) need "$@"; endpoint="$2"; shift 2 ;;
    --rdzv-endpoint=* | --rdzv_endpoint=*) endpoint="${1#*=}"; shift ;;
    --rdzv-id | --rdzv_id) need "$@"; rdzv_id="$2"; shift 2 ;;
    --rdzv-id=* | --rdzv_id=*) rdzv_id="${1#*=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    -*) passthrough+=("$1"); shift ;;
    *) lss_die "unexpected argument '$1': trainer arguments go after -- (see --help)" ;;
  esac
done

[ -n "$nproc" ] || lss_die "--nproc-per-node P is required (see --help)"
for v in nproc nnodes node_rank; do
  val="${!v}"
  [ -z "$val" ] || [[ "$val" =~ ^[0-9]+$ ]] || lss_die "--${v//_/-} must be a number, got '$val'"
done
nnodes="${nnodes:-1}"

PY="$(lss_python)"
cmd=("$PY" -m torch.distributed.run --nproc-per-node "$nproc")
if [ "$nnodes" = 1 ] && [ -z "$endpoint" ]; then
  cmd+=(--standalone)
else
  [ -n "$endpoint" ] || lss_die "--nnodes $nnodes needs --rdzv-endpoint HOST:PORT (node 0)"
  [[ "$endpoint" == *:* ]] || lss_die "--rdzv-endpoint must be HOST:PORT, got '$endpoint'"
  if [ -n "$node_rank" ]; then
    [ "$node_rank" -lt "$nnodes" ] || lss_die "--node-rank $node_rank must be < --nnodes $nnodes"
    cmd+=(--nnodes "$nnodes" --node-rank "$node_rank"
      --master-addr "${endpoint%:*}" --master-port "${endpoint##*:}")
  else
    cmd+=(--nnodes "$nnodes" --rdzv-backend c10d --rdzv-endpoint "$endpoint"
      --rdzv-id "$rdzv_id")
  fi
fi
cmd+=("${passthrough[@]}" -m lss_megatron.train "$@")

{
  printf 'torchrun.sh: PYTHONPATH=%s\n' "$PYTHONPATH"
  printf 'torchrun.sh:'
  printf ' %q' "${cmd[@]}"
  printf '\n'
} >&2
[ "$dry_run" = 0 ] || exit 0
lss_validate "$PY" "$((nproc * nnodes))" "$nproc" "$@" || exit $?
exec "${cmd[@]}"
