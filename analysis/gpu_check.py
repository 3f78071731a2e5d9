"""GPU readiness in one command: ``bash launch/gpu_check.sh --out-dir DIR [--dry-run]``.

On one CUDA device (the H200 lent for tests: Python 3.12, torch 2.11; the launcher installs
megatron-core from launch/wheels/, see docs/measurement.md), within 10 minutes:

1. ``attention_checks``: every path the trainer's LSS (and Ulysses) attention takes, as one rank of
   N sees it after the K/V gather: rank 0 (square causal), the last rank (``q_offset > 0``,
   lower-right causal), a zigzag chunk pair, GQA, non-causal; in bf16 via autocast with fp32
   inputs (what Megatron's layers hand it) and in fp32; outputs and input gradients against the
   float64 math reference; and which SDPA kernel ran (seen through a dispatch mode), asserted:
   flash or cuDNN for bf16, the memory-efficient kernel for fp32, never the math kernel;
2. ``matmul_peak_flops``: the bf16 GEMM peak (8192^3);
3. ``attention_efficiency``: LSS partial attention of the last (most loaded) rank and of rank 0
   of N = 8 for l/N = 4K ... 64K (h 32, h_kv 8, d 128), fp32 leaves under bf16 autocast as the
   trainer feeds it, forward + backward; model FLOPs (3 x 4 b h d x attended pairs) per second as
   a fraction of the measured matmul peak;
4. ``trainer``: ``python -m lss_megatron.train`` in serial and in lss (N = 1) for a few bf16 steps
   with the counters on; the rows, the cost model's prediction beside them, and that the two
   modes' losses agree (same model, same data: to 2e-2 in bf16);
5. writes everything to ONE file, ``DIR/gpu_check.json``, rewritten after each phase (a run cut
   short keeps what it measured). It is the record the cost model reads: copy it to
   ``analysis/data/gpu/<device>.json`` (`analysis.costmodel.hw.get_device` takes its matmul peak
   and its attention efficiency).

Exit status 0 when every check passed, 1 otherwise (``failures`` in the JSON say which).
``--dry-run`` runs the same code on the CPU at toy sizes (tests/e2e/test_gpu_check.py), where the
expected kernel is the CPU flash kernel.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path

import torch

from lss_megatron.modes import METHOD, REFERENCE

ROOT = Path(__file__).resolve().parents[1]
KERNEL_OPS = {
    "_scaled_dot_product_flash_attention": "flash",
    "_flash_attention_forward": "flash",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_efficient_attention": "efficient",
    "_efficient_attention_forward": "efficient",
    "_scaled_dot_product_flash_attention_for_cpu": "cpu_flash",
}
"""aten ops of the fused SDPA kernels (forward) and the kernel each one is. The math kernel has
no op of its own (it decomposes into matmuls): no fused op seen means math ran."""
EXPECTED = {
    ("cuda", torch.bfloat16): {"flash", "cudnn"},
    ("cuda", torch.float32): {"efficient"},
    ("cpu", torch.bfloat16): {"cpu_flash"},
    ("cpu", torch.float32): {"cpu_flash"},
}
TOLERANCE = {torch.bfloat16: (2e-2, 5e-2), torch.float32: (1e-4, 1e-4)}
"""(output, gradients) max error relative to the reference's largest magnitude. bf16: inputs and
output rounded to 8 mantissa bits (2^-9 ~ 2e-3 each), sums over the keys in fp32: a few 1e-3,
gradients (sums over all queries) a few times that. fp32: the kernel accumulates in fp32 in a
different order than the float64 reference: ~1e-6; 1e-4 leaves room for long rows."""
SIZES = {
    "gpu": dict(
        check=dict(sq=256, n=4, b=2, d=64),
        mm=8192,
        mm_reps=20,
        eff_n=8,
        eff_local=[4096, 8192, 16384, 32768, 65536],
        eff=dict(h=32, h_kv=8, d=128),
        eff_reps=2,
    ),
    "dry": dict(
        check=dict(sq=16, n=2, b=2, d=16),
        mm=128,
        mm_reps=2,
        eff_n=2,
        eff_local=[32, 64],
        eff=dict(h=4, h_kv=2, d=16),
        eff_reps=1,
    ),
}
TRAIN_ARGS = {
    "gpu": [
        "--num-layers",
        "4",
        "--hidden-size",
        "2048",
        "--num-heads",
        "16",
        "--num-kv-heads",
        "4",
        "--seq-length",
        "8192",
        "--vocab-size",
        "32000",
        "--global-batch-size",
        "2",
        "--micro-batch-size",
        "1",
        "--steps",
        "5",
        "--position-embedding",
        "rope",
    ],
    "dry": [
        "--num-layers",
        "2",
        "--hidden-size",
        "32",
        "--num-heads",
        "4",
        "--num-kv-heads",
        "2",
        "--seq-length",
        "64",
        "--vocab-size",
        "64",
        "--global-batch-size",
        "2",
        "--steps",
        "2",
    ],
}
COMMON_TRAIN = [
    "--dtype",
    "bf16",
    "--optimizer",
    "adamw",
    "--progress",
    "off",
    "--eval-interval",
    "0",
    "--dist-timeout",
    "120",
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernels_seen(fn) -> set[str]:
    """The fused SDPA kernels (`KERNEL_OPS`) that ran inside ``fn()``; {"math"} if none did."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set[str] = set()

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in KERNEL_OPS:
                seen.add(KERNEL_OPS[name])
            return func(*args, **(kwargs or {}))

    with Spy():
        fn()
    return seen or {"math"}


# --- 1. attention paths against the float64 reference ---------------------------------------------
CASES = [  # name, heads, kv heads, causal, layout, rank ("last": N-1)
    ("rank0-causal", 8, 8, True, "contiguous", 0),
    ("last-rank-causal", 8, 8, True, "contiguous", "last"),
    ("gqa-rank0-causal", 8, 2, True, "contiguous", 0),
    ("gqa-last-rank-causal", 8, 2, True, "contiguous", "last"),
    ("gqa-zigzag-rank1", 8, 2, True, "zigzag", 1),
    ("gqa-non-causal", 8, 2, False, "contiguous", 1),
]


def _rank_attention(q, k, v, r, n, layout, causal, backend="auto"):
    """What LSS rank r of n computes after its gather: the compute-dtype cast (before the
    gather in the trainer), then its partial attention over the rank-ordered K/V."""
    from lss_megatron.lss.kernel import to_compute_dtype
    from lss_megatron.lss.operator import _partial

    q, k, v = to_compute_dtype(q, k, v)
    return _partial(q, k, v, r, n, layout, causal, 1.0 / math.sqrt(q.shape[-1]), backend)


def attention_case(device, dtype, name, h, h_kv, causal, layout, rank, sq, n, b, d) -> dict:
    """One path: the kernel that ran and the errors against the float64 math reference.
    bf16 = fp32 leaves under bf16 autocast (as in the trainer); fp32 = fp32 leaves."""
    r = n - 1 if rank == "last" else rank
    g = torch.Generator(device="cpu").manual_seed(zlib.crc32(name.encode()))
    q = torch.randn(sq, b, h, d, generator=g)
    k, v = (torch.randn(n * sq, b, h_kv, d, generator=g) for _ in range(2))
    dout = torch.randn(sq, b, h, d, generator=g)
    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    grads = {}

    def run():
        with autocast:
            out = _rank_attention(*leaves, r, n, layout, causal)
        grads["out"] = out.detach().double()
        grads["qkv"] = torch.autograd.grad(out, leaves, dout.to(device, out.dtype))

    kernels = kernels_seen(run)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = _rank_attention(*ref_leaves, r, n, layout, causal, backend="math")
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.to(device, torch.float64))

    def rel(a, b_):
        return float((a.double() - b_).abs().max() / b_.abs().max().clamp_min(1e-30))

    out_err = rel(grads["out"], ref.detach())
    grad_err = max(rel(a, b_) for a, b_ in zip(grads["qkv"], ref_grads, strict=True))
    tol_out, tol_grad = TOLERANCE[dtype]
    expected = EXPECTED[(device.type, dtype)]
    ok = (
        bool(kernels & expected)
        and "math" not in kernels
        and out_err <= tol_out
        and grad_err <= tol_grad
    )
    return {
        "case": name,
        "dtype": str(dtype).removeprefix("torch."),
        "rank": r,
        "n": n,
        "q_offset_first": r * sq if layout == "contiguous" else r * sq // 2,
        "heads": h,
        "kv_heads": h_kv,
        "layout": layout,
        "causal": causal,
        "kernels": sorted(kernels),
        "expected_kernels": sorted(expected),
        "output_rel_err": out_err,
        "grad_rel_err": grad_err,
        "tolerance": [tol_out, tol_grad],
        "ok": ok,
    }


def attention_checks(device: torch.device, sq: int, n: int, b: int, d: int) -> list[dict]:
    return [
        attention_case(device, dtype, *case, sq=sq, n=n, b=b, d=d)
        for dtype in (torch.bfloat16, torch.float32)
        for case in CASES
    ]


# --- 2. matmul peak; 3. LSS attention efficiency --------------------------------------------------
def _time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def matmul_peak(device: torch.device, n: int, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / _time(lambda: a @ b, device, repeats)


def attention_efficiency(
    device, peak: float, local: int, n: int, h: int, h_kv: int, d: int, repeats: int
) -> list[dict]:
    """The last rank and rank 0 of N at l/N = `local`: fp32 leaves under bf16 autocast, causal,
    forward + backward; model FLOPs 3 x 4 h d x pairs (b = 1)."""
    rows = []
    for which, r in (("last", n - 1), ("first", 0)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        q = torch.randn(local, 1, h, d, device=device, requires_grad=True)
        k, v = (
            torch.randn(n * local, 1, h_kv, d, device=device, requires_grad=True) for _ in range(2)
        )
        dout = torch.randn(local, 1, h, d, device=device, dtype=torch.bfloat16)

        def step(q=q, k=k, v=v, dout=dout, r=r):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = _rank_attention(q, k, v, r, n, "contiguous", True)
            out.backward(dout)

        t = _time(step, device, repeats)
        pairs = local * (r * local) + local * (local + 1) // 2
        flops = 3 * 4 * h * d * pairs
        rows.append(
            {
                "rank": which,
                "seq_parallel": n,
                "local_len": local,
                "seq_length": n * local,
                "heads": h,
                "kv_heads": h_kv,
                "head_dim": d,
                "time_s": t,
                "flops": flops,
                "tflops": flops / t / 1e12,
                "fraction_of_matmul_peak": flops / t / peak,
                "peak_mem_bytes": int(torch.cuda.max_memory_allocated(device))
                if device.type == "cuda"
                else None,
            }
        )
        del q, k, v, dout
    return rows


# --- 4. the trainer on the device -------------------------------------------------------------------
def trainer_run(mode: str, out: Path, size: str, timeout_s: float) -> dict:
    """`python -m lss_megatron.train` (one process: serial, or lss with N = 1) with the counters
    on; its metrics rows and the cost model's prediction of the counted fields beside them."""
    from .costmodel import predict

    args = [
        sys.executable,
        "-m",
        "lss_megatron.train",
        "--mode",
        mode,
        "--seq-parallel",
        "1",
        *TRAIN_ARGS[size],
        *COMMON_TRAIN,
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if size == "dry":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU model, on any host
    t0 = time.perf_counter()
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=ROOT
    )
    result = {"mode": mode, "exit_code": proc.returncode, "wall_s": time.perf_counter() - t0}
    if proc.returncode != 0:
        result["stderr_tail"] = proc.stderr[-3000:]
        return result
    config = json.loads((out / "config.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    pred = predict(config)
    keys = (
        "sp_comm_bytes",
        "grad_comm_bytes",
        "other_comm_bytes",
        "activation_bytes",
        "param_bytes",
        "grad_bytes",
        "optimizer_state_bytes",
    )
    result.update(
        runtime=config["runtime"],
        rows=rows,
        predicted={k: pred[k] for k in keys},
        summary=json.loads((out / "summary.json").read_text()),
    )
    return result


def trainer_checks(out_dir: Path, size: str) -> tuple[dict, list[str]]:
    runs = {
        mode: trainer_run(mode, out_dir / "train" / mode, size, timeout_s=240)
        for mode in (REFERENCE, METHOD)
    }
    failures = [f"trainer {m}: exit {r['exit_code']}" for m, r in runs.items() if r["exit_code"]]
    if not failures:
        for mode, r in runs.items():
            if not all(math.isfinite(row["loss"]) for row in r["rows"]):
                failures.append(f"trainer {mode}: a non-finite loss")
        a, b = (runs[m]["rows"][0]["loss"] for m in (REFERENCE, METHOD))
        runs["step1_loss_difference"] = abs(a - b)
        if abs(a - b) > 2e-2:  # bf16 (3 significant digits), different attention kernels
            failures.append(f"trainer: step-1 loss serial {a} vs lss {b} differ by > 2e-2")
    return runs, failures


# --- the run -----------------------------------------------------------------------------------
def _environment(device: torch.device) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "megatron_core": ver("megatron-core"),
        "deepspeed": ver("deepspeed"),
    }


def _phase(result: dict, path: Path, name: str, fn) -> None:
    """Run one phase; record its result, or its error as a failure; rewrite the JSON."""
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - one failing phase must not hide the others
        result["failures"].append(f"{name}: {type(exc).__name__}: {exc}")
        result.setdefault("tracebacks", {})[name] = traceback.format_exc()[-4000:]
    result["phase_seconds"][name] = round(time.perf_counter() - t0, 2)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")


def run(out_dir: Path, dry_run: bool = False) -> dict:
    """All phases (module doc); returns the record also written to ``out_dir/gpu_check.json``."""
    size = "dry" if dry_run else "gpu"
    sz = SIZES[size]
    device = torch.device("cpu") if dry_run else torch.device("cuda", torch.cuda.current_device())
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_check.json"
    result = {**_environment(device), "dry_run": dry_run, "failures": [], "phase_seconds": {}}

    def checks():
        rows = result["attention_checks"] = attention_checks(device, **sz["check"])
        result["failures"] += [
            f"attention {r['case']} {r['dtype']}: kernels {r['kernels']}, "
            f"errors {r['output_rel_err']:.2e}/{r['grad_rel_err']:.2e}"
            for r in rows
            if not r["ok"]
        ]

    def peak():
        result["matmul_peak_flops"] = matmul_peak(device, sz["mm"], sz["mm_reps"])
        result["matmul_n"] = sz["mm"]

    def efficiency():
        result["attention_efficiency"] = []
        for local in sz["eff_local"]:
            result["attention_efficiency"] += attention_efficiency(
                device,
                result["matmul_peak_flops"],
                local,
                sz["eff_n"],
                repeats=sz["eff_reps"],
                **sz["eff"],
            )

    def trainer():
        result["trainer"], failures = trainer_checks(out_dir, size)
        result["failures"] += failures

    for name, fn in (
        ("attention_checks", checks),
        ("matmul_peak", peak),
        ("attention_efficiency", efficiency),
        ("trainer", trainer),
    ):
        _phase(result, path, name, fn)
    result["ok"] = not result["failures"]
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="bash launch/gpu_check.sh", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--out-dir", type=Path, required=True, help="where gpu_check.json goes")
    ap.add_argument("--dry-run", action="store_true", help="the same code on the CPU, toy sizes")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_check: error: no CUDA device here; --dry-run runs the same code on the CPU",
            file=sys.stderr,
        )
        return 2
    result = run(args.out_dir, args.dry_run)
    print(
        json.dumps(
            {
                k: result.get(k)
                for k in ("device", "torch", "matmul_peak_flops", "ok", "failures", "phase_seconds")
            },
            indent=2,
        )
    )
    print(f"gpu_check: wrote {args.out_dir / 'gpu_check.json'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
