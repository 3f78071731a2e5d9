"""Peak memory of one LSS attention forward + backward with and without chunked K/V gathers.

`python -m analysis.kv_chunks_memory [--seq-length L] [--chunks 1 2 4]` spawns N gloo ranks per
setting (a fresh process each) and reports, per setting, the peak growth of the heap in use during
one fwd+bwd of `lss_attention` on rank 0, the bytes saved for backward, and the communication.

Peak heap: `lss_megatron.training.metrics.heap_peak_mode` (glibc's bytes in use, sampled after every
torch operation); RSS would hide the transient buffers behind allocator caching.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from datetime import timedelta


def _worker(rank, world, store, chunks, seq, heads, kv_heads, dim, q):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    from lss_megatron.lss.operator import lss_attention
    from lss_megatron.parallel import comm
    from lss_megatron.training.metrics import count_saved_bytes, heap_peak_mode

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    s = seq // world
    g = torch.Generator().manual_seed(rank)
    lq = torch.randn(s, 1, heads, dim, generator=g, requires_grad=True)
    lk = torch.randn(s, 1, kv_heads, dim, generator=g, requires_grad=True)
    lv = torch.randn(s, 1, kv_heads, dim, generator=g, requires_grad=True)
    dout = torch.randn(s, 1, heads, dim, generator=g)
    # warm up kernels and allocator pools on a tiny problem, then measure
    lss_attention(
        lq[:2].detach().requires_grad_(),
        lk[:2].detach().requires_grad_(),
        lv[:2].detach().requires_grad_(),
        kv_chunks=1,
    ).sum().backward()
    dist.barrier()
    with comm.record() as log, heap_peak_mode() as heap:
        saved = count_saved_bytes(
            lambda: lss_attention(lq, lk, lv, kv_chunks=chunks).backward(dout)
        )
    growth = heap.peak - heap.base
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        q.put(
            {
                "chunks": chunks,
                "peak_growth_bytes": growth,
                "saved_bytes": saved,
                "sp_comm_bytes": log.nbytes("sp"),
                "sp_comm_calls": log.count(category="sp"),
            }
        )


def measure(
    chunks: int, seq: int = 8192, world: int = 2, heads: int = 8, kv_heads: int = 8, dim: int = 64
) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_worker, args=(r, world, store, chunks, seq, heads, kv_heads, dim, q)
            )
            for r in range(world)
        ]
        for p in procs:
            p.start()
        out = q.get(timeout=300)
        for p in procs:
            p.join(timeout=60)
    full_kv = seq * kv_heads * dim * 4 * 2  # gathered [K | V], fp32, b = 1
    return {**out, "seq_length": seq, "world": world, "gathered_kv_bytes": full_kv}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-length", type=int, default=8192)
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 4])
    args = ap.parse_args(argv)
    for c in args.chunks:
        print(json.dumps(measure(c, args.seq_length)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
