"""Compute microbenchmarks of one single-thread process (the trainer's OMP_NUM_THREADS=1 ranks):
linear layers, the trainer's attention kernels, elementwise bandwidth, and the slowdown when
several such processes run at once."""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time

import torch

from lss_megatron.lss.dense_attention import dense_attention
from lss_megatron.lss.kernel import partial_attention

from ..costmodel.calibrated import BASE_HEAD_DIM

GEMM_SHAPES = {  # (m tokens, k, n)
    "full": [
        (m, k, n)
        for m in (32, 128, 512, 2048)
        for k, n in ((64, 64), (128, 384), (128, 512), (512, 128), (256, 1024))
    ],
    "quick": [(64, 64, 64), (512, 128, 512), (2048, 256, 1024)],
}
ATTENTION_SHAPES = {  # (heads, kv heads, d, sq, sk): sq = sk is one causal block, sq < sk the last
    "full": [(h, h // 2, d, s, s) for h, d in ((8, 16), (4, 32)) for s in (64, 256, 512, 1024)]
    + [
        (h, h // 2, d, s // n, s)
        for h, d in ((8, 16), (4, 32))
        for s in (512, 1024, 2048)
        for n in (2, 4)
    ],  # segments of LSS
    "quick": [(8, 4, 16, 128, 128), (8, 4, 16, 256, 1024), (4, 2, 32, 256, 256)],
}

ELEMENTWISE_ELEMS = {
    "full": [1 << 12, 1 << 15, 1 << 17, 1 << 20, 1 << 22],
    "quick": [1 << 14, 1 << 20],
}


def bench(fn, min_time: float = 0.2, min_reps: int = 3) -> float:
    """Median seconds per call of `fn()` after one warm-up call, over >= min_reps calls and at
    least `min_time` seconds."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def linear_rates(kind: str, min_time: float) -> list[list[float]]:
    """[[flops per call, FLOP/s], ...] of `nn.functional.linear` forward + backward (input and
    weight gradients: 3 GEMMs of 2 m k n FLOPs), sorted by FLOPs."""
    out = []
    for m, k, n in GEMM_SHAPES[kind]:
        x = torch.randn(m, k, requires_grad=True)
        w = torch.randn(n, k, requires_grad=True)
        b = torch.randn(n, requires_grad=True)
        g = torch.randn(m, n)

        def step(x=x, w=w, b=b, g=g):
            torch.nn.functional.linear(x, w, b).backward(g)

        flops = 3.0 * 2 * m * k * n
        out.append([flops, flops / bench(step, min_time)])
    return sorted(out)


def causal_pairs(sq: int, sk: int) -> int:
    """Query-key pairs a causal kernel visits for the last sq queries of sk keys (the cost
    model's count for the most loaded LSS rank; sq = sk: sq (sq + 1) / 2)."""
    return sq * (sk - sq) + sq * (sq + 1) // 2


def attention_rates(kind: str, min_time: float) -> dict:
    """{"flash": [[executed FLOPs, FLOP/s]], "dense": [...]} of the trainer's kernels forward +
    backward at head dimension `BASE_HEAD_DIM`, and ``flash_d32``, ``dense_d32`` at the others
    (the rate of a kernel depends on d as well as on its FLOPs: a dense kernel's score traffic per
    FLOP falls as 1/d); flash FLOPs 3 x 4 h d x visited pairs; dense 3 x 4 h d sq sk (the full
    square)."""
    out: dict = {"flash": [], "dense": []}
    for h, hkv, d, sq, sk in ATTENTION_SHAPES[kind]:
        q = torch.randn(sq, 1, h, d, requires_grad=True)  # [sq, b, h, d]
        k = torch.randn(sk, 1, hkv, d, requires_grad=True)  # [sk, b, h_kv, d]
        v = torch.randn(sk, 1, hkv, d, requires_grad=True)
        g = torch.randn(sq, 1, h, d)
        for name, fn, pairs in (
            ("flash", partial_attention, causal_pairs(sq, sk)),
            ("dense", dense_attention, sq * sk),
        ):

            def step(fn=fn, q=q, k=k, v=v, g=g, off=sk - sq):
                fn(q, k, v, q_offset=off, causal=True).backward(g)

            flops = 3.0 * 4 * h * d * pairs
            key = name if d == BASE_HEAD_DIM else f"{name}_d{d}"
            out.setdefault(key, []).append([flops, flops / bench(step, min_time)])
    return {k: sorted(v) for k, v in out.items()}


def elementwise_rates(kind: str, min_time: float) -> list[list[float]]:
    """[[bytes per tensor, bytes/s]] of c = a + b (two reads and one write per element)."""
    out = []
    for n in ELEMENTWISE_ELEMS[kind]:
        a, b, c = torch.randn(n), torch.randn(n), torch.empty(n)
        seconds = bench(lambda a=a, b=b, c=c: torch.add(a, b, out=c), min_time)
        out.append([4.0 * n, 3 * 4.0 * n / seconds])
    return sorted(out)


def _matmul_worker(start, seconds: float, queue) -> None:
    torch.set_num_threads(1)
    a, b = torch.randn(512, 256), torch.randn(256, 256)
    a @ b
    start.wait()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        calls += 1
    queue.put((time.perf_counter() - t0) / calls)


def concurrency(ranks: list[int], seconds: float) -> dict:
    """{P: per-process matmul time with P processes at once / with one}, measured."""
    ctx = mp.get_context("fork")
    per_call = {}
    for p in sorted({1, *ranks}):
        start, queue = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_matmul_worker, args=(start, seconds, queue)) for _ in range(p)]
        for proc in procs:
            proc.start()
        time.sleep(0.2)  # every worker past its warm-up
        start.set()
        times = [queue.get(timeout=60 + seconds) for _ in procs]
        for proc in procs:
            proc.join()
        per_call[p] = max(times)  # the slowest rank sets the pace
    return {str(p): max(1.0, per_call[p] / per_call[1]) for p in per_call}
