"""Every collective of lss_megatron goes through this module, so it can be counted and timed.

Byte convention (what one rank sends under ring algorithms, on a group of n ranks):
all-gather or reduce-scatter of a full tensor of M bytes counts (n-1)/n * M, all-reduce
2 (n-1)/n * M. A collective on a group of one rank is skipped and not counted.

Every call carries a `category`:
* ``sp``    sequence-parallel activation traffic (the fused K/V gather and its reduce-scatter),
* ``grad``  gradient synchronisation (double gradient averaging),
* ``other`` everything else (loss reduction, checks).

Counting: ``with comm.record() as log: ...`` collects every call made inside the block, on this
rank, into ``log`` (a `CommLog`). Timeouts: every collective runs on a process group created with
the run's ``--dist-timeout``, so a hung peer raises instead of hanging.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

CATEGORIES = ("sp", "grad", "other")


@dataclass
class CommLog:
    """Calls and bytes per (op, category) seen while recording, on this rank."""

    calls: dict = field(default_factory=lambda: defaultdict(int))
    bytes: dict = field(default_factory=lambda: defaultdict(int))
    seconds: dict = field(default_factory=lambda: defaultdict(float))

    def add(self, op: str, category: str, nbytes: int, seconds: float) -> None:
        self.calls[(op, category)] += 1
        self.bytes[(op, category)] += nbytes
        self.seconds[(op, category)] += seconds

    def count(self, op: str | None = None, category: str | None = None) -> int:
        return sum(
            c
            for (o, k), c in self.calls.items()
            if (op is None or o == op) and (category is None or k == category)
        )

    def nbytes(self, category: str | None = None) -> int:
        return sum(b for (_, k), b in self.bytes.items() if category is None or k == category)

    def summary(self) -> dict:
        out = {}
        for cat in CATEGORIES:
            out[f"{cat}_comm_bytes"] = self.nbytes(cat)
            out[f"{cat}_comm_calls"] = self.count(category=cat)
        return out


_recorders: list[CommLog] = []


@contextlib.contextmanager
def record() -> Iterator[CommLog]:
    """Record every collective issued by this process inside the block."""
    log = CommLog()
    _recorders.append(log)
    try:
        yield log
    finally:
        _recorders.remove(log)


def _note(op: str, category: str, nbytes: int, seconds: float) -> None:
    if category not in CATEGORIES:
        raise ValueError(f"unknown comm category {category!r}; expected one of {CATEGORIES}")
    for log in _recorders:
        log.add(op, category, nbytes, seconds)


def group_size(group) -> int:
    return dist.get_world_size(group)


def group_rank(group) -> int:
    return dist.get_rank(group)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


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
    t0 = time.perf_counter()
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)
    _note("all_gather", category, (n - 1) * _nbytes(x), time.perf_counter() - t0)
    return out


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
    t0 = time.perf_counter()
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, x, op=dist.ReduceOp.SUM, group=group)
    _note("reduce_scatter", category, (n - 1) * _nbytes(out), time.perf_counter() - t0)
    return out


def all_reduce_(x: torch.Tensor, group, *, category: str) -> torch.Tensor:
    """In-place sum of `x` over the group."""
    n = group_size(group)
    if n == 1:
        return x
    t0 = time.perf_counter()
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    _note("all_reduce", category, 2 * (n - 1) * _nbytes(x) // n, time.perf_counter() - t0)
    return x


# ---------------------------------------------------------------------------------------------
# fused communication: one all-gather of [K | V] forward, one reduce-scatter of [dK | dV] backward
# ---------------------------------------------------------------------------------------------


class _FusedKVAllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k: torch.Tensor, v: torch.Tensor, group):
        ctx.group = group
        ctx.h_kv = k.shape[2]
        kv = torch.cat([k, v], dim=2)  # [s/N, b, 2*h_kv, d]
        kv_full = all_gather_dim0(kv, group, category="sp")  # [s, b, 2*h_kv, d]
        return kv_full[:, :, : ctx.h_kv], kv_full[:, :, ctx.h_kv :]  # 2 x [s, b, h_kv, d]

    @staticmethod
    def backward(ctx, dk_full: torch.Tensor | None, dv_full: torch.Tensor | None):
        if dk_full is None:
            dk_full = torch.zeros_like(dv_full)
        if dv_full is None:
            dv_full = torch.zeros_like(dk_full)
        dkv_full = torch.cat([dk_full, dv_full], dim=2)  # [s, b, 2*h_kv, d]
        dkv = reduce_scatter_dim0(dkv_full, ctx.group, category="sp")  # [s/N, b, 2*h_kv, d]
        return dkv[:, :, : ctx.h_kv], dkv[:, :, ctx.h_kv :], None  # 2 x [s/N, b, h_kv, d]


def fused_kv_all_gather(
    k: torch.Tensor, v: torch.Tensor, group
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's fused communication: gather the local K and V segments of every rank of the
    sequence group in ONE all-gather of the concatenated buffer; its backward is ONE
    reduce-scatter (sum) of the concatenated gradients, so each rank receives every rank's
    contribution to its own K and V.

    k, v: [s/N, b, h_kv, d] -> k_full, v_full: [s, b, h_kv, d] (views of one gathered buffer).
    """
    if k.shape != v.shape:
        raise ValueError(f"fused_kv_all_gather: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    return _FusedKVAllGather.apply(k, v, group)


def all_gather_object(obj, group=None, *, category: str = "other") -> list:
    """Gather a picklable object from every rank of the group (checks and summaries only)."""
    n = group_size(group)
    if n == 1:
        return [obj]
    out = [None] * n
    t0 = time.perf_counter()
    dist.all_gather_object(out, obj, group=group)
    _note("all_gather_object", category, 0, time.perf_counter() - t0)
    return out
