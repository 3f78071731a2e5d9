"""GPU checks in one command: LSS per-rank attention and one layer's training step on one GPU.

`bash launch/gpu_check.sh` (= `python -m analysis.gpu_check`) measures, on the one GPU it finds:

1. the device's bf16 matmul peak (8192^3 GEMM, TFLOP/s) as the reference for everything below;
2. LSS partial attention of ONE rank of a sequence group of N (the last, most loaded contiguous
   segment: l/N local queries against all l keys, causal, bf16, the memory-efficient kernel the
   package uses on CUDA), forward + backward, for l up to 64K;
3. one training step (forward + backward) of a realistic transformer layer (E 4096, 32 heads,
   8 kv heads, FFN 14336) on that rank's l/N tokens, attending to all l keys,

and writes TFLOP/s (model FLOPs, backward = 2 x forward), fraction of the measured matmul peak
and peak memory (`max_memory_allocated`) to ``analysis/data/gpu/<device>.json``. The cost model
(`analysis.costmodel.hw.get_device`) uses the measured matmul peak when that file exists.

`--device cpu --tiny` runs the same code at toy sizes on the CPU (what the tests do), so the
script stays runnable between the rare sessions that have a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

OUT_DIR = Path(__file__).resolve().parent / "data" / "gpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def matmul_peak(device, dtype, n: int, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _time(lambda: a @ b, device, repeats)


def attention_check(device, dtype, seq: int, n: int, heads: int, kv_heads: int, dim: int,
                    repeats: int) -> dict:  # fmt: skip
    """Last rank of N: l/N causal queries at offset l - l/N against all l keys."""
    from lss_megatron.lss.kernel import partial_attention

    sq = seq // n
    _peak_reset(device)
    q = torch.randn(sq, 1, heads, dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(seq, 1, kv_heads, dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(seq, 1, kv_heads, dim, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn(sq, 1, heads, dim, device=device, dtype=dtype)

    def step():
        out = partial_attention(q, k, v, q_offset=seq - sq, causal=True)
        out.backward(dout)

    t = _time(step, device, repeats)
    pairs = sq * (seq - sq) + sq * (sq + 1) // 2
    flops = 3 * 4 * heads * dim * pairs  # forward 4 h d pairs; backward 2 x forward
    return {"seq_length": seq, "seq_parallel": n, "local_queries": sq, "time_s": t,
            "flops": flops, "tflops": flops / t / 1e12, "peak_mem_bytes": _peak(device)}  # fmt: skip


def layer_check(device, dtype, seq: int, n: int, hidden: int, heads: int, kv_heads: int,
                ffn: int, repeats: int) -> dict:  # fmt: skip
    """One layer's forward + backward on the l/N local tokens (last rank) against all l keys."""
    from lss_megatron.lss.kernel import partial_attention

    d, sq = hidden // heads, seq // n
    _peak_reset(device)

    def w(*shape):
        return (
            torch.randn(*shape, device=device, dtype=dtype) / math.sqrt(shape[-1])
        ).requires_grad_()

    wqkv, wo = w((heads + 2 * kv_heads) * d, hidden), w(hidden, heads * d)
    w1, w2 = w(ffn, hidden), w(hidden, ffn)
    x = torch.randn(sq, 1, hidden, device=device, dtype=dtype, requires_grad=True)
    remote_kv = torch.randn(seq - sq, 1, 2 * kv_heads, d, device=device, dtype=dtype)

    def step():
        h = F.layer_norm(x, (hidden,))
        qkv = F.linear(h, wqkv)  # [l/N, 1, (h + 2 h_kv) d]
        q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q = q.view(sq, 1, heads, d)  # [l/N, 1, h, d]
        kv_local = torch.cat([k.view(sq, 1, kv_heads, d), v.view(sq, 1, kv_heads, d)], dim=2)
        kv = torch.cat([remote_kv, kv_local], dim=0)  # [l, 1, 2 h_kv, d] as after the gather
        a = partial_attention(q, kv[:, :, :kv_heads], kv[:, :, kv_heads:], q_offset=seq - sq,
                              causal=True)  # fmt: skip
        y = x + F.linear(a.reshape(sq, 1, heads * d), wo)
        y = y + F.linear(F.gelu(F.linear(F.layer_norm(y, (hidden,)), w1)), w2)
        y.float().square().mean().backward()

    t = _time(step, device, repeats)
    per_token = 2 * hidden * (heads + 2 * kv_heads) * d + 2 * heads * d * hidden + 4 * hidden * ffn
    pairs = sq * (seq - sq) + sq * (sq + 1) // 2
    flops = 3 * (sq * per_token + 4 * heads * d * pairs)
    return {"seq_length": seq, "seq_parallel": n, "local_tokens": sq, "time_s": t, "flops": flops,
            "tflops": flops / t / 1e12, "peak_mem_bytes": _peak(device)}  # fmt: skip


def run(device: str = "cuda", tiny: bool = False, n: int = 8, out_dir: Path = OUT_DIR) -> Path:
    dev = torch.device(device)
    dtype = torch.bfloat16
    if tiny:
        sizes, mm, reps = [64, 128], 256, 1
        layer = dict(hidden=64, heads=4, kv_heads=2, ffn=128)
    else:
        sizes, mm, reps = [8192, 16384, 32768, 65536], 8192, 5
        layer = dict(hidden=4096, heads=32, kv_heads=8, ffn=14336)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = matmul_peak(dev, dtype, mm, reps)
    result = {"device": name, "dtype": "bf16", "matmul_peak_flops": peak, "matmul_n": mm,
              "torch": torch.__version__, "attention": [], "layer": []}  # fmt: skip
    for seq in sizes:
        a = attention_check(dev, dtype, seq, n, layer["heads"], layer["kv_heads"],
                            layer["hidden"] // layer["heads"], reps)  # fmt: skip
        a["fraction_of_matmul_peak"] = a["tflops"] * 1e12 / peak
        result["attention"].append(a)
        lyr = layer_check(dev, dtype, seq, n, repeats=reps, **layer)
        lyr["fraction_of_matmul_peak"] = lyr["tflops"] * 1e12 / peak
        result["layer"].append(lyr)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "device"
    path = out_dir / f"{slug}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (CPU smoke test)")
    ap.add_argument("--seq-parallel", type=int, default=8, help="N of the simulated rank")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("no CUDA device here; use --device cpu --tiny for a smoke run")
    path = run(args.device, args.tiny, args.seq_parallel, args.out_dir)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
