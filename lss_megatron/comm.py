"""Every collective of lss_megatron goes through this module, so it can be counted and timed.

Byte convention (what one rank sends under ring algorithms, on a group of n ranks):
all-gather or reduce-scatter of a full tensor of M bytes counts (n-1)/n * M; all-reduce
2 (n-1)/n * M; all-to-all (n-1)/n of the local tensor; broadcast M on the source rank;
point-to-point the bytes sent. A collective on a group of one rank is skipped and not counted.

Every call carries a `category`:
* ``sp``    sequence-parallel activation traffic (LSS's fused K/V gather and its reduce-scatter;
            Megatron's tensor/sequence-parallel gathers and reduce-scatters in nvidia-sp),
* ``grad``  gradient synchronisation (double gradient averaging, DeepSpeed's reductions),
* ``other`` everything else (loss reduction, checks, checkpoint gathers).

Counting: ``with comm.record() as log: ...`` collects every collective issued by this process
inside the block into ``log`` (a `CommLog`): this module's own calls with the category they name,
and also collectives issued by other code (Megatron's tensor-parallel mappings, DeepSpeed), which
are caught by wrapping `torch.distributed`'s primitives for the duration of the block and
categorised by the process group they run on (`tag_group`). Timeouts: every collective runs on a
process group created with the run's ``--dist-timeout``, so a hung peer raises instead of hanging.

Time: a blocking collective's time is its call; an async one (the fused K/V gather's start/finish
pair) counts its launch plus the wait in `finish_kv_all_gather`, so a straggler shows up. A
collective whose bytes cannot be read from its arguments raises under tests (pytest imported, or
``LSS_STRICT_COMM=1``) and otherwise warns once per op and counts 0 bytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

CATEGORIES = ("sp", "grad", "other")
STRICT_ENV = "LSS_STRICT_COMM"
"""``LSS_STRICT_COMM=1``: a collective whose bytes cannot be read raises (as under pytest)."""
_log = logging.getLogger(__name__)


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

    def add_wait(self, op: str, category: str, seconds: float) -> None:
        """Time spent waiting for an async collective already counted by `add`."""
        self.seconds[(op, category)] += seconds

    def count(self, op: str | None = None, category: str | None = None) -> int:
        return sum(
            c
            for (o, k), c in self.calls.items()
            if (op is None or o == op) and (category is None or k == category)
        )

    def nbytes(self, category: str | None = None) -> int:
        return sum(b for (_, k), b in self.bytes.items() if category is None or k == category)

    def time_s(self, category: str | None = None) -> float:
        return sum(t for (_, k), t in self.seconds.items() if category is None or k == category)

    def summary(self) -> dict:
        out = {}
        for cat in CATEGORIES:
            out[f"{cat}_comm_bytes"] = self.nbytes(cat)
            out[f"{cat}_comm_calls"] = self.count(category=cat)
            out[f"{cat}_comm_time_s"] = self.time_s(cat)
        return out


_recorders: list[CommLog] = []
_group_tags: dict[int, tuple[object, str]] = {}
_tls = threading.local()


def tag_group(group, category: str) -> None:
    """Collectives that other code runs on `group` count under `category` (default ``other``)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown comm category {category!r}; expected one of {CATEGORIES}")
    if group is not None:
        _group_tags[id(group)] = (group, category)


def _category_of(group) -> str:
    explicit = getattr(_tls, "category", None)
    if explicit is not None:
        return explicit
    tag = _group_tags.get(id(group)) if group is not None else None
    return tag[1] if tag is not None else "other"


@contextlib.contextmanager
def _as(category: str):
    """Collectives issued inside count under `category` (this module's own calls)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown comm category {category!r}; expected one of {CATEGORIES}")
    prev = getattr(_tls, "category", None)
    _tls.category = category
    try:
        yield
    finally:
        _tls.category = prev


# --- interception of torch.distributed primitives while recording ------------------------------
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _size(group) -> int:
    return dist.get_world_size(group)


def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


# op name -> bytes this rank sends (convention in the module docstring); tensors may come
# positionally or by keyword (DeepSpeed passes them by keyword)
def _t(a, k, i, *names):
    if len(a) > i:
        return a[i]
    for name in names:
        if name in k:
            return k[name]
    raise KeyError(names)


def _g(a, k, name):
    return _size(_arg(a, k, _GROUP_ARG[name], "group"))


_BYTES = {
    "all_gather_single": lambda a, k: (
        (_g(a, k, "all_gather_single") - 1) * _nbytes(_t(a, k, 1, "input_tensor", "input"))
    ),
    "reduce_scatter_single": lambda a, k: (
        (_g(a, k, "reduce_scatter_single") - 1) * _nbytes(_t(a, k, 0, "output", "output_tensor"))
    ),
    "all_reduce": lambda a, k: (
        2 * (_g(a, k, "all_reduce") - 1) * _nbytes(_t(a, k, 0, "tensor")) // _g(a, k, "all_reduce")
    ),
    "all_to_all_single": lambda a, k: (
        (_g(a, k, "all_to_all_single") - 1)
        * _nbytes(_t(a, k, 1, "input"))
        // _g(a, k, "all_to_all_single")
    ),
    "all_gather": lambda a, k: (_g(a, k, "all_gather") - 1) * _nbytes(_t(a, k, 1, "tensor")),
    "reduce_scatter": lambda a, k: (
        (_g(a, k, "reduce_scatter") - 1) * _nbytes(_t(a, k, 0, "output"))
    ),
    "all_to_all": lambda a, k: (
        sum(_nbytes(t) for t in _t(a, k, 1, "input_tensor_list"))
        * (_g(a, k, "all_to_all") - 1)
        // _g(a, k, "all_to_all")
    ),
    "broadcast": lambda a, k: (
        _nbytes(_t(a, k, 0, "tensor")) if dist.get_rank() == _arg(a, k, 1, "src") else 0
    ),
    "send": lambda a, k: _nbytes(_t(a, k, 0, "tensor")),
    "isend": lambda a, k: _nbytes(_t(a, k, 0, "tensor")),
    "recv": lambda a, k: 0,
    "irecv": lambda a, k: 0,
}
_GROUP_ARG = {"all_gather_single": 2, "reduce_scatter_single": 3, "all_reduce": 2,
              "all_to_all_single": 4, "all_gather": 2, "reduce_scatter": 3, "all_to_all": 2,
              "broadcast": 2, "send": 2, "isend": 2, "recv": 2, "irecv": 2}  # fmt: skip
_saved: dict[tuple[object, str], object] = {}
_installs = 0
_warned: set[str] = set()


def _strict() -> bool:
    """Under tests (pytest imported, or ``LSS_STRICT_COMM=1``) unreadable bytes are an error."""
    return os.environ.get(STRICT_ENV) == "1" or "pytest" in sys.modules


def _unreadable(name: str, exc: Exception) -> int:
    """Bytes of a collective whose arguments could not be read: raise under tests, else warn
    once per op and count 0."""
    msg = (f"comm.record: cannot read the bytes of a {name} call ({type(exc).__name__}: {exc}); "
           "counted as 0 bytes")  # fmt: skip
    if _strict():
        raise RuntimeError(msg) from exc
    if name not in _warned:
        _warned.add(name)
        _log.warning("%s (warned once per op)", msg)
    return 0


def _wrap(name: str, fn):
    def wrapped(*args, **kwargs):
        if getattr(_tls, "depth", 0):  # an inner primitive of a call already counted
            return fn(*args, **kwargs)
        group = _arg(args, kwargs, _GROUP_ARG[name], "group")
        if _size(group) == 1:
            return fn(*args, **kwargs)
        try:
            nbytes = int(_BYTES[name](args, kwargs))
        except Exception as exc:  # noqa: BLE001 - outside tests, counting never breaks a call
            nbytes = _unreadable(name, exc)
        category = _category_of(group)
        _tls.depth = 1
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _tls.depth = 0
            for log in _recorders:
                log.add(name.removesuffix("_single"), category, nbytes, time.perf_counter() - t0)

    wrapped.__wrapped__ = fn
    return wrapped


def _install() -> None:
    global _installs
    _installs += 1
    if _installs > 1:
        return
    for name in _BYTES:
        for ns in (dist, c10d):
            fn = getattr(ns, name, None)
            if fn is not None:
                _saved[(ns, name)] = fn
                setattr(ns, name, _wrap(name, fn))


def _uninstall() -> None:
    global _installs
    _installs -= 1
    if _installs > 0:
        return
    for (ns, name), fn in _saved.items():
        setattr(ns, name, fn)
    _saved.clear()


@contextlib.contextmanager
def record() -> Iterator[CommLog]:
    """Record every collective issued by this process inside the block."""
    log = CommLog()
    _recorders.append(log)
    _install()
    try:
        yield log
    finally:
        _uninstall()
        _recorders.remove(log)


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
    with _as(category):
        gather(out, x, group=group)
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
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    with _as(category):
        scatter(out, x, op=dist.ReduceOp.SUM, group=group)
    return out


def all_reduce_(x: torch.Tensor, group, *, category: str) -> torch.Tensor:
    """In-place sum of `x` over the group."""
    n = group_size(group)
    if n == 1:
        return x
    with _as(category):
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


# ---------------------------------------------------------------------------------------------
# fused communication: one all-gather of [K | V] forward, one reduce-scatter of [dK | dV] backward
# ---------------------------------------------------------------------------------------------


def _kv_gather_backward(ctx, dk_full: torch.Tensor | None, dv_full: torch.Tensor | None):
    """Adjoint of the [K | V] all-gather: ONE reduce-scatter (sum) of [dK | dV]."""
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
    return finish_kv_all_gather(k, v, start_kv_all_gather(k, v, group))


class PendingKVGather:
    """An all-gather of one local [K | V] buffer in flight (async), finished by
    `finish_kv_all_gather`; lets the caller attend chunk c while chunk c+1 travels."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, group):
        if k.shape != v.shape:
            raise ValueError(f"kv gather: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
        self.group = group
        self.h_kv = k.shape[2]
        n = group_size(group)
        kv = torch.cat([k.detach(), v.detach()], dim=2).contiguous()  # [s/N, b, 2*h_kv, d]
        if n == 1:
            self.out, self.work = kv, None
            return
        self.out = torch.empty((n * kv.shape[0], *kv.shape[1:]), dtype=kv.dtype, device=kv.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        with _as("sp"):
            self.work = gather(self.out, kv, group=group, async_op=True)  # [s, b, 2*h_kv, d]


class _FinishKVGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k: torch.Tensor, v: torch.Tensor, pending: PendingKVGather):
        ctx.group, ctx.h_kv = pending.group, pending.h_kv
        if pending.work is not None:
            t0 = time.perf_counter()
            pending.work.wait()
            for log in _recorders:  # the launch was counted by the wrapped call
                log.add_wait("all_gather", "sp", time.perf_counter() - t0)
        kv_full = pending.out  # [s, b, 2*h_kv, d]
        return kv_full[:, :, : ctx.h_kv], kv_full[:, :, ctx.h_kv :]  # 2 x [s, b, h_kv, d]

    backward = staticmethod(_kv_gather_backward)


def start_kv_all_gather(k: torch.Tensor, v: torch.Tensor, group) -> PendingKVGather:
    """Launch the fused [K | V] all-gather of local k, v [s/N, b, h_kv, d] asynchronously."""
    return PendingKVGather(k, v, group)


def finish_kv_all_gather(k: torch.Tensor, v: torch.Tensor, pending: PendingKVGather):
    """Wait for `pending` (started from these k, v) and return the gathered K, V
    [s, b, h_kv, d]; autograd-connected to k and v: its backward is one reduce-scatter."""
    return _FinishKVGather.apply(k, v, pending)


def all_gather_object(obj, group=None, *, category: str = "other") -> list:
    """Gather a picklable object from every rank of the group (checks and summaries only)."""
    n = group_size(group)
    if n == 1:
        return [obj]
    out = [None] * n
    with _as(category):
        dist.all_gather_object(out, obj, group=group)
    return out
