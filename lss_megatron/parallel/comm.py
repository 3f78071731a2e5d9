"""Every collective of lss_megatron goes through this module, so it can be counted and timed.

The API: `all_gather_dim0`, `start_all_gather_dim0` (async), `reduce_scatter_dim0`,
`start_reduce_scatter_dim0` (async),
`all_reduce_`, `start_ring_shift` (async send to the next rank, receive from the previous),
`all_gather_object`, `max_over_ranks`, `group_size` / `group_rank`. Every call
that moves training data names a `category`:

* ``sp``    sequence-parallel activation traffic (LSS's fused K/V gather and its reduce-scatter;
            Megatron's tensor/sequence-parallel gathers and reduce-scatters in nvidia-sp),
* ``grad``  gradient synchronisation (double gradient averaging, DeepSpeed's reductions),
* ``other`` everything else (loss reduction, checks, checkpoint plan and outcome exchanges).

Byte convention (what one rank sends under ring algorithms, on a group of n ranks):
all-gather or reduce-scatter of a full tensor of M bytes counts (n-1)/n * M; all-reduce
2 (n-1)/n * M; all-to-all (n-1)/n of the local tensor; broadcast M on the source rank;
point-to-point the bytes sent. A collective on a group of one rank is skipped and not counted.

Counting and timing live in `lss_megatron.parallel.recording`: ``with comm.record() as log:``
collects every collective of the block, this module's and other code's (Megatron, DeepSpeed;
categorised by `tag_group`), into a `CommLog`. Timeouts: every collective runs on a process
group created with the run's ``--dist-timeout``, so a hung peer raises instead of hanging.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .recording import CATEGORIES, CommLog, as_category, record, tag_group

__all__ = [
    "CATEGORIES",
    "CommLog",
    "PendingShift",
    "all_gather_dim0",
    "all_gather_object",
    "all_reduce_",
    "backend_all_reduce_",
    "group_rank",
    "group_size",
    "max_over_ranks",
    "record",
    "reduce_scatter_dim0",
    "start_all_gather_dim0",
    "start_reduce_scatter_dim0",
    "start_ring_shift",
    "tag_group",
]


def group_size(group) -> int:
    return dist.get_world_size(group)


def group_rank(group) -> int:
    return dist.get_rank(group)


# ---------------------------------------------------------------------------------------------
# raw collectives (no autograd)
# ---------------------------------------------------------------------------------------------


def all_gather_dim0(x: torch.Tensor, group, *, category: str) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0 in rank order: [s, ...] -> [n*s, ...]."""
    n = group_size(group)
    if n == 1:
        return x
    x = x.contiguous()
    out = torch.empty((n * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    with as_category(category):
        gather(out, x, group=group)
    return out


def start_all_gather_dim0(x: torch.Tensor, group, *, category: str):
    """Launch `all_gather_dim0` asynchronously: returns (out [n*s, ...], work); `work.wait()`
    (None on a group of one rank, where out is x) before reading out. Counted like the blocking
    one; while recording, the time counted runs from the launch to the end of ``work.wait()``."""
    n = group_size(group)
    x = x.contiguous()
    if n == 1:
        return x, None
    out = torch.empty((n * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    with as_category(category):
        work = gather(out, x, group=group, async_op=True)
    return out, work


def reduce_scatter_dim0(x: torch.Tensor, group, *, category: str) -> torch.Tensor:
    """Sum `x` over the group and keep this rank's dim-0 slice: [n*s, ...] -> [s, ...]."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[0] % n:
        raise ValueError(
            f"reduce_scatter_dim0: dim 0 ({x.shape[0]}) not divisible by group size {n}"
        )
    x = x.contiguous()
    out = torch.empty((x.shape[0] // n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    with as_category(category):
        scatter(out, x, op=dist.ReduceOp.SUM, group=group)
    return out


def start_reduce_scatter_dim0(x: torch.Tensor, group, *, category: str):
    """Launch `reduce_scatter_dim0` asynchronously: returns (out [s, ...], work); `work.wait()`
    (None on a group of one rank, where out is x) before reading out. Counted like the blocking
    one; while recording, the time counted runs from the launch to the end of ``work.wait()``."""
    n = group_size(group)
    if n == 1:
        return x, None
    if x.shape[0] % n:
        raise ValueError(
            f"start_reduce_scatter_dim0: dim 0 ({x.shape[0]}) not divisible by group size {n}"
        )
    x = x.contiguous()
    out = torch.empty((x.shape[0] // n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    with as_category(category):
        work = scatter(out, x, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return out, work


def all_reduce_(x: torch.Tensor, group, *, category: str) -> torch.Tensor:
    """In-place sum of `x` over the group."""
    n = group_size(group)
    if n == 1:
        return x
    with as_category(category):
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def backend_all_reduce_(x: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum of `x` over the group, issued even on a group of ONE rank (which
    `all_reduce_` skips): it exercises the backend itself, e.g. NCCL in a sandbox
    (analysis/gpu_check.py's first phase). Category ``other``."""
    with as_category("other"):
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def max_over_ranks(value: float, device=None, group=None) -> float:
    """The largest `value` over the group (default: every rank), e.g. the slowest rank's step
    time. Not categorised for the counters: call it outside `record()`."""
    if group_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    with as_category("other"):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def all_gather_object(obj, group=None, *, category: str = "other") -> list:
    """Gather a picklable object from every rank of the group (checks and summaries only)."""
    n = group_size(group)
    if n == 1:
        return [obj]
    out = [None] * n
    with as_category(category):
        dist.all_gather_object(out, obj, group=group)
    return out


class PendingShift:
    """A ring shift in flight (`start_ring_shift`): ``wait()`` finishes its send and its receive
    and returns the received tensor. It holds the sent tensor until then (gloo reads it
    asynchronously)."""

    def __init__(self, sent: torch.Tensor, received: torch.Tensor, works: list):
        self._sent, self._received, self._works = sent, received, works

    def wait(self) -> torch.Tensor:
        for work in self._works:
            work.wait()
        self._works, self._sent = [], None
        return self._received


def start_ring_shift(
    x: torch.Tensor, group, *, category: str, tag: int = 0, reverse: bool = False
) -> PendingShift:
    """Send `x` to the next rank of the group and receive the previous rank's tensor of the same
    shape and dtype, asynchronously (one ``isend`` and one ``irecv``): ``.wait()`` returns what
    rank r-1 sent (`reverse`: send to r-1, receive from r+1). Counted as ``isend`` (the bytes of `x`) and ``irecv`` (0 bytes: the sender
    counts them) under `category`; while recording, each one's time runs from the launch to the
    end of ``wait()``. `tag` keeps two shifts in flight between the same ranks apart. On a group
    of one rank the tensor comes straight back and nothing is counted."""
    n = group_size(group)
    x = x.contiguous()
    if n == 1:
        return PendingShift(x, x, [])
    r = group_rank(group)
    out = torch.empty_like(x)
    step = -1 if reverse else 1
    nxt = dist.get_global_rank(group, (r + step) % n) if group is not None else (r + step) % n
    prv = dist.get_global_rank(group, (r - step) % n) if group is not None else (r - step) % n
    with as_category(category):
        works = [
            dist.isend(x, nxt, group=group, tag=tag),
            dist.irecv(out, prv, group=group, tag=tag),
        ]
    return PendingShift(x, out, works)
