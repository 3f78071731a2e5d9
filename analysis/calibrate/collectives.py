"""gloo latency and bandwidth of the collectives the trainer uses, through its comm module, at
each requested rank count: one process per rank (one thread each), a file rendezvous."""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lss_megatron.parallel import comm

SIZES = {"full": [1 << 8, 1 << 12, 1 << 16, 1 << 19, 1 << 22], "quick": [1 << 8, 1 << 18]}
"""Bytes of each rank's local tensor (all-gather input; reduce-scatter, all-reduce, all-to-all
the full tensor)."""


def counted_bytes(op: str, local: int, n: int) -> int:
    """What the trainer counts a rank sending (lss_megatron/parallel/comm.py's convention)."""
    if op == "all_gather":
        return (n - 1) * local
    if op == "all_reduce":
        return 2 * (n - 1) * local // n
    return (n - 1) * local // n  # reduce-scatter of the full tensor, all-to-all


def _call(op: str, x: torch.Tensor):
    if op == "all_gather":
        return comm.all_gather_dim0(x, None, category="other")
    if op == "reduce_scatter":
        return comm.reduce_scatter_dim0(x, None, category="other")
    if op == "all_reduce":
        return comm.all_reduce_(x, None, category="other")
    out = torch.empty_like(x)  # all-to-all: DeepSpeed-Ulysses' call, which comm counts
    dist.all_to_all_single(out, x)
    return out


def _time_op(op: str, nbytes: int, n: int, reps: int) -> float:
    """Seconds per call on the slowest rank (mean over `reps` calls after two warm-ups)."""
    x = torch.zeros(max(n, nbytes // 4 // n * n))  # divisible by n for reduce-scatter / a2a
    for _ in range(2):
        _call(op, x)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        _call(op, x)
    return comm.max_over_ranks((time.perf_counter() - t0) / reps)


def _worker(rank: int, n: int, store: str, kind: str, queue) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=n,
        timeout=timedelta(seconds=120),
    )
    rows = []
    for op in ("all_gather", "reduce_scatter", "all_reduce", "all_to_all"):
        for size in SIZES[kind]:
            reps = 20 if size < (1 << 16) else 5
            seconds = _time_op(op, size, n, reps if kind == "full" else max(3, reps // 4))
            local = torch.zeros(max(n, size // 4 // n * n)).numel() * 4
            rows.append([op, counted_bytes(op, local, n), seconds])
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def measure(n: int, kind: str, timeout: float = 300.0) -> list[list]:
    """[[op, counted bytes, seconds per call], ...] on n gloo ranks."""
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="calibrate-gloo-") as tmp:
        store = str(Path(tmp) / "store")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(r, n, store, kind, queue)) for r in range(n)]
        for p in procs:
            p.start()
        try:
            rows = queue.get(timeout=timeout)
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    return rows


def fit(rows: list[list]) -> dict:
    """{op: [alpha s, bandwidth bytes/s]} per op: alpha the time of the smallest message, the
    bandwidth from the smallest to the largest (a non-positive difference, i.e. no measurable
    per-byte cost: 1e12 B/s). Two points, not least squares: the times span three decades."""
    out = {}
    for op in sorted({r[0] for r in rows}):
        pts = sorted((float(r[1]), float(r[2])) for r in rows if r[0] == op)
        (x0, t0), (x1, t1) = pts[0], pts[-1]
        bw = (x1 - x0) / (t1 - t0) if t1 > t0 and x1 > x0 else 1e12
        out[op] = [max(t0 - x0 / bw, 1e-6), bw]
    return out
