"""Peak memory of one LSS attention forward + backward with and without chunked K/V gathers.

`python -m analysis.kv_chunks_memory [--seq-length L] [--chunks 1 2 4]` spawns N gloo ranks per
setting (a fresh process each) and reports, per setting, the peak growth of the heap in use during
one fwd+bwd of `lss_attention` on rank 0, the bytes saved for backward, and the communication.

Peak heap: glibc's `mallinfo2()` (bytes in use, including mmap'd blocks, which is where torch's
large CPU tensors live) sampled after every torch operation through a `TorchDispatchMode`, so
the peak is taken at op granularity; RSS would hide it behind allocator caching. On GPU use
`torch.cuda.max_memory_allocated` instead.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import tempfile
from datetime import timedelta


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]  # fmt: skip


def heap_in_use() -> int:
    """Bytes malloc has handed out and not taken back (glibc), mmap'd blocks included."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def heap_peak_mode():
    """A TorchDispatchMode recording the peak of `heap_in_use()` after every torch op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HeapPeak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.base = heap_in_use()
            self.peak = self.base

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, heap_in_use())
            return out

    return HeapPeak()


def _worker(rank, world, store, chunks, seq, heads, kv_heads, dim, q):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    from lss_megatron import comm
    from lss_megatron.attention import count_saved_bytes
    from lss_megatron.operator import lss_attention

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))  # fmt: skip
    s = seq // world
    g = torch.Generator().manual_seed(rank)
    lq = torch.randn(s, 1, heads, dim, generator=g, requires_grad=True)
    lk = torch.randn(s, 1, kv_heads, dim, generator=g, requires_grad=True)
    lv = torch.randn(s, 1, kv_heads, dim, generator=g, requires_grad=True)
    dout = torch.randn(s, 1, heads, dim, generator=g)
    # warm up kernels and allocator pools on a tiny problem, then measure
    lss_attention(lq[:2].detach().requires_grad_(), lk[:2].detach().requires_grad_(),
                  lv[:2].detach().requires_grad_(), kv_chunks=1).sum().backward()  # fmt: skip
    dist.barrier()
    with comm.record() as log, heap_peak_mode() as heap:
        saved = count_saved_bytes(
            lambda: lss_attention(lq, lk, lv, kv_chunks=chunks).backward(dout)
        )
    growth = heap.peak - heap.base
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        q.put({"chunks": chunks, "peak_growth_bytes": growth, "saved_bytes": saved,
               "sp_comm_bytes": log.nbytes("sp"), "sp_comm_calls": log.count(category="sp")})  # fmt: skip


def measure(
    chunks: int, seq: int = 8192, world: int = 2, heads: int = 8, kv_heads: int = 8, dim: int = 64
) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world, store, chunks, seq, heads, kv_heads,
                                                   dim, q)) for r in range(world)]  # fmt: skip
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
