"""GPU readiness and the cross-mode comparison in one command:
``bash launch/gpu_check.sh --out-dir DIR [--overwrite] [--dry-run]``.

On one CUDA device (one H100 or H200 for 15 minutes, start included: Python 3.12, torch 2.11; the
launcher installs megatron-core, deepspeed and their requirements from launch/wheels/, see
docs/measurement.md), planned at most `BUDGET_S` seconds in all (`planned_seconds`):

0. ``nccl_smoke``: one all-reduce on a one-rank NCCL group (gloo in the dry run), first, so a
   sandbox NCCL failure is named before anything else runs;
1. ``attention_checks``: every path the trainer's LSS (and Ulysses) attention takes, as one rank of
   N sees it after the K/V gather: rank 0 (square causal), the last rank (``q_offset > 0``,
   lower-right causal), a zigzag chunk pair, GQA, non-causal; in bf16 via autocast with fp32
   inputs and in fp32; outputs and input gradients against the float64 math reference; and the
   fused SDPA kernel that ran forward AND backward (seen through a dispatch mode), asserted:
   flash for bf16 (the priority is pinned flash first, `lss.kernel.sdpa_priority`), the
   memory-efficient kernel for fp32, never math;
2. ``matmul_peak``: the bf16 GEMM peak (8192^3): warm-ups, one CUDA-event interval per rep,
   median and min, the SM clock before and after where readable;
3. ``attention_efficiency``: LSS partial attention of the last (most loaded) rank and of rank 0
   of N = 8 for l/N = 4K ... 64K (h 32, h_kv 8, d 128), forward + backward, with the inputs the
   bf16 trainer feeds (bf16 q, K/V as views of one gathered [K | V] buffer); every rep's time,
   FLOPs by both conventions (model: 3 x forward; flash: 3.5 x forward, backward recomputing the
   scores), the peak memory of the row alone (the previous row freed first);
4. ``mode_emulation``: every mode's per-rank work for one layer at one equal layout (P = 8:
   lss, lss-zigzag, ulysses, nvidia-sp; first, middle and last rank where ranks differ), the
   modes' own Megatron layers on the rank's shards (`analysis.emulate`): measured compute,
   modelled communication (the counted bytes priced at NVLink and InfiniBand), the cost model's
   prediction beside them, printed as a table;
5. ``trainer``: ``python -m lss_megatron.train`` in serial and in lss (N = 1) for a few bf16 steps
   with the counters on; the rows, the cost model's prediction beside them, and that the two
   modes' losses agree (same model, same data: to 2e-2 in bf16);

and writes everything to ONE file, ``DIR/gpu_check.json``, rewritten after each phase (a run cut
short keeps what it measured), with ``planned_seconds`` (per phase) and ``phase_seconds``
(measured). TF32 is enabled for fp32 matmuls on CUDA, and recorded. It is the record the cost
model reads: copy it to ``analysis/data/gpu/<device>.json`` (`analysis.costmodel.hw.get_device`
takes its matmul peak and its attention efficiency).

Exit status 0 when every check passed, 1 otherwise (``failures`` in the JSON say which), 2 for a
bad command line (an output folder that already holds a check, without ``--overwrite``).
``--dry-run`` runs the same code on the CPU at toy sizes (tests/unit/test_gpu_check.py,
tests/e2e/test_gpu_check.py), where the expected kernel is the CPU flash kernel; its
``planned_seconds`` are the GPU plan's.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path

import torch

from lss_megatron.modes import METHOD, REFERENCE

from .timing import KERNEL_OPS, kernels_seen, pinned_sdpa, sm_clock_mhz, sync, time_reps

__all__ = ["KERNEL_OPS", "kernels_seen"]
ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 420
"""The planned seconds of every phase together (`planned_seconds`), install and imports
included: what a 15-minute device lease leaves after the machine's start and a rerun's margin."""
HARD_STOP_S = 540
"""A phase whose plan would end past this (seconds since the launcher started) is skipped and
named in ``failures``: the device call's own limit is 600 s."""
EXPECTED = {
    ("cuda", torch.bfloat16): {"flash"},
    ("cuda", torch.float32): {"efficient"},
    ("cpu", torch.bfloat16): {"cpu_flash"},
    ("cpu", torch.float32): {"cpu_flash"},
}
"""The one kernel every row of a (device, dtype) must run, forward and backward: SDPA's priority
is pinned flash first on CUDA (`lss.kernel.CUDA_KERNELS`); fp32 cannot run flash there."""
TOLERANCE = {torch.bfloat16: (2e-2, 5e-2), torch.float32: (1e-4, 1e-4)}
"""(output, gradients) max error relative to the reference's largest magnitude. bf16: inputs and
output rounded to 8 mantissa bits (2^-9 ~ 2e-3 each), sums over the keys in fp32: a few 1e-3,
gradients (sums over all queries) a few times that. fp32: the kernel accumulates in fp32 in a
different order than the float64 reference: ~1e-6; 1e-4 leaves room for long rows (TF32 is for
matmuls, not the fused attention kernels)."""
SIZES = {
    "gpu": dict(
        check=dict(sq=256, n=4, b=2, d=64),
        mm=8192,
        mm_warmup=5,
        mm_reps=20,
        eff_n=8,
        eff_local=[4096, 8192, 16384, 32768, 65536],
        eff=dict(h=32, h_kv=8, d=128),
        eff_warmup=2,
        eff_reps=5,
        emu="gpu",
        emu_warmup=3,
        emu_reps=7,
    ),
    "dry": dict(
        check=dict(sq=16, n=2, b=2, d=16),
        mm=128,
        mm_warmup=3,
        mm_reps=5,
        eff_n=2,
        eff_local=[32, 64],
        eff=dict(h=4, h_kv=2, d=16),
        eff_warmup=1,
        eff_reps=5,
        emu="dry",
        emu_warmup=1,
        emu_reps=5,
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
    "--overwrite",  # a rerun into the same --out-dir replaces the check's own trainer runs
]
PHASES = (
    "setup",
    "nccl_smoke",
    "attention_checks",
    "matmul_peak",
    "attention_efficiency",
    "mode_emulation",
    "trainer",
)
"""``setup``: from the launcher's start (install, imports) to the first phase."""


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

    with pinned_sdpa(device):
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
        set(kernels["forward"]) == expected == set(kernels["backward"])
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
        "kernels": kernels,
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


# --- 0. the backend first -----------------------------------------------------------------------
def backend_smoke(device: torch.device) -> dict:
    """One all-reduce on a one-rank process group of the device's backend (NCCL on CUDA, gloo on
    the CPU), through `parallel.comm.backend_all_reduce_` (which, unlike the trainer's calls,
    does not skip a group of one). Runs in the process that calls it (`nccl_smoke` gives it a
    process of its own)."""
    import torch.distributed as dist

    from lss_megatron.parallel import comm

    backend = "nccl" if device.type == "cuda" else "gloo"
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)  # port 0: a free port
    t0 = time.perf_counter()
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, store=store, rank=0, world_size=1, **kwargs)
    try:
        x = torch.arange(4, dtype=torch.float32, device=device)
        comm.backend_all_reduce_(x)
        sync(device)
        values = x.tolist()
        version = str(torch.cuda.nccl.version()) if backend == "nccl" else None
    finally:
        dist.destroy_process_group()
    return {
        "backend": backend,
        "nccl_version": version,
        "result": values,
        "ok": values == [0.0, 1.0, 2.0, 3.0],
        "seconds": time.perf_counter() - t0,
    }


SMOKE_TIMEOUT_S = 90


def nccl_smoke(device: torch.device, timeout_s: float = SMOKE_TIMEOUT_S, command=None) -> dict:
    """`backend_smoke` in a process of its own, first: a sandbox where NCCL cannot start (an
    error, or a hang in its transport probing) is named here, with the tail of NCCL's own
    warnings (``NCCL_DEBUG=WARN``), and never hangs the check; this process never builds an
    NCCL group (the emulation runs on the fake backend, the trainer in its own processes).
    `command` replaces the child's command line (tests)."""
    cmd = command or [
        sys.executable,
        "-c",
        "import json, torch; from analysis.gpu_check import backend_smoke; "
        f"print('SMOKE ' + json.dumps(backend_smoke(torch.device({str(device)!r}))))",
    ]
    env = {**os.environ, "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN")}
    if device.type != "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ""
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=ROOT
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-2000:]
        return {
            "ok": False,
            "error": f"no answer within {timeout_s:.0f} s (a hang in the backend's start?)",
            "stderr_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail,
        }
    lines = [x for x in proc.stdout.splitlines() if x.startswith("SMOKE ")]
    if proc.returncode != 0 or not lines:
        return {
            "ok": False,
            "error": f"exit {proc.returncode}",
            "stderr_tail": proc.stderr[-3000:],
        }
    return json.loads(lines[-1].removeprefix("SMOKE "))


# --- 2. matmul peak; 3. LSS attention efficiency --------------------------------------------------
def matmul_peak(device: torch.device, n: int, warmup: int, reps: int) -> dict:
    """bf16 n x n x n GEMM: `warmup` untimed products (the clock ramps up from idle), then one
    interval per rep; FLOP/s of the median rep (``flops``, what the cost model reads) and of the
    fastest (``flops_best``); the SM clock before and after where readable."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    clock_before = sm_clock_mhz(device)
    times = time_reps(lambda: a @ b, device, warmup=warmup, reps=reps)
    clock_after = sm_clock_mhz(device)
    flops = 2 * n**3
    return {
        "n": n,
        "warmup": warmup,
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "flops": flops / statistics.median(times),
        "flops_best": flops / min(times),
        "sm_clock_before": clock_before,
        "sm_clock_after": clock_after,
    }


def _efficiency_row(device, peak, which, r, local, n, h, h_kv, d, warmup, reps) -> dict:
    """One rank's partial attention at l/N = `local`, everything allocated here and freed on
    return. Inputs as the bf16 trainer feeds them: bf16 q [l/N, 1, h, d] and K, V as the two
    halves of one gathered [K | V] buffer [l, 1, 2 h_kv, d] (`lss.kv_gather`)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    q = torch.randn(local, 1, h, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(n * local, 1, 2 * h_kv, d, device=device, dtype=torch.bfloat16)
    kv.requires_grad_()
    dout = torch.randn(local, 1, h, d, device=device, dtype=torch.bfloat16)

    def step():
        q.grad = kv.grad = None
        k, v = kv[:, :, :h_kv], kv[:, :, h_kv:]  # 2 x [l, 1, h_kv, d], views
        out = _rank_attention(q, k, v, r, n, "contiguous", True)  # [l/N, 1, h, d]
        out.backward(dout)

    with pinned_sdpa(device):
        kernels = kernels_seen(step)
        times = time_reps(step, device, warmup=warmup, reps=reps)
    peak_mem = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    pairs = local * (r * local) + local * (local + 1) // 2
    forward = 4 * h * d * pairs
    median = statistics.median(times)
    return {
        "rank": which,
        "seq_parallel": n,
        "local_len": local,
        "seq_length": n * local,
        "heads": h,
        "kv_heads": h_kv,
        "head_dim": d,
        "dtype": "bf16",
        "inputs": "bf16 q; K, V views of one gathered [K|V] buffer (as the bf16 trainer)",
        "warmup": warmup,
        "times_s": times,
        "time_s": median,
        "min_s": min(times),
        "kernels": kernels,
        "flops": 3 * forward,
        "flops_flash_convention": forward + 5 * forward // 2,
        "tflops": 3 * forward / median / 1e12,
        "tflops_flash_convention": 3.5 * forward / median / 1e12,
        "fraction_of_matmul_peak": 3 * forward / median / peak,
        "fraction_of_matmul_peak_flash_convention": 3.5 * forward / median / peak,
        "peak_mem_bytes": peak_mem,
    }


def attention_efficiency(
    device, peak: float, local: int, n: int, h: int, h_kv: int, d: int, warmup: int, reps: int
) -> list[dict]:
    """The last rank and rank 0 of N at l/N = `local`, causal, forward + backward; model FLOPs
    3 x 4 h d x pairs (b = 1), and FlashAttention's convention (backward 2.5 x forward) beside.
    Each row's peak memory is its own: the previous row is freed before the next allocates."""
    rows = []
    for which, r in (("last", n - 1), ("first", 0)):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(_efficiency_row(device, peak, which, r, local, n, h, h_kv, d, warmup, reps))
    return rows


# --- 4. every mode's per-rank layer work -------------------------------------------------------
def mode_emulation(device: torch.device, sz: dict, predict_device: str) -> tuple[list, list]:
    """`analysis.emulate` over its plan; (rows, failures)."""
    from .emulate import SHAPES, emulate_row, plan

    shape = SHAPES[sz["emu"]]
    rows, failures = [], []
    for label, rank in plan(shape):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with pinned_sdpa(device):
            row = emulate_row(
                label,
                shape,
                rank,
                device,
                warmup=sz["emu_warmup"],
                reps=sz["emu_reps"],
                predict_device=predict_device,
            )
        rows.append(row)
        name = f"mode_emulation {label} rank {rank}"
        if row["sp_bytes"] != row["cost_model"]["sp_bytes"]:
            failures.append(
                f"{name}: counted {row['sp_bytes']} sp bytes, the cost model "
                f"{row['cost_model']['sp_bytes']}"
            )
        if row["comm_categories"] not in ([], ["sp"]):
            failures.append(f"{name}: collectives outside the sp group: {row['comm_categories']}")
        if not row["output_finite"]:
            failures.append(f"{name}: a non-finite output")
    return rows, failures


def _kernel_rows(result: dict) -> dict[tuple[str, str], dict[str, set]]:
    """{(dtype, direction): {kernel: the rows that ran it}} over every row that ran a fused
    kernel (attention checks, efficiency, emulation)."""
    seen: dict[tuple[str, str], dict[str, set]] = {}
    rows = [(r["dtype"], r["case"], r["kernels"]) for r in result.get("attention_checks", [])]
    rows += [
        ("bf16", f"efficiency {r['rank']} l/N={r['local_len']}", r["kernels"])
        for r in result.get("attention_efficiency", [])
    ]
    rows += [
        ("bf16", f"emulation {r['variant']} rank {r['rank']}", r["kernels"])
        for r in result.get("mode_emulation", [])
    ]
    for dtype, where, kernels in rows:
        dtype = {"bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)
        for direction in ("forward", "backward"):
            for k in kernels.get(direction, []):
                seen.setdefault((dtype, direction), {}).setdefault(k, set()).add(where)
    return seen


def kernel_summary(result: dict) -> dict[str, dict[str, int]]:
    """{"bf16 forward": {kernel: rows}, ...}: what the check prints and records."""
    return {
        f"{dtype} {direction}": {k: len(w) for k, w in sorted(by_kernel.items())}
        for (dtype, direction), by_kernel in sorted(_kernel_rows(result).items())
    }


def kernel_mix(result: dict, device: torch.device) -> list[str]:
    """One SDPA kernel per (dtype, direction) across every row that ran one (attention checks,
    efficiency, emulation): the failures naming a mix, or a kernel other than `EXPECTED`."""
    failures = []
    for (dtype, direction), by_kernel in sorted(_kernel_rows(result).items()):
        torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        expected = EXPECTED[(device.type, torch_dtype)]
        if len(by_kernel) > 1 or set(by_kernel) != expected:
            detail = "; ".join(
                f"{k}: {len(w)} rows, e.g. {sorted(w)[0]}" for k, w in sorted(by_kernel.items())
            )
            failures.append(
                f"SDPA kernel mix ({dtype} {direction}): expected only {sorted(expected)}, "
                f"saw {detail}"
            )
    return failures


def planned_seconds(size: str = "gpu") -> dict:
    """The plan of every phase in seconds, estimated before anything runs (the dry run records
    the GPU plan): fixed overheads (install and imports, NCCL start, CUDA context and lazy kernel
    loading, subprocess starts) plus the compute of every timed and untimed call at the H100's
    datasheet bf16 peak times stated efficiencies (GEMMs 0.5, attention 0.3; conservative: the
    measured ones are higher); emulation rows by the cost model's layer time."""
    from .costmodel.hw import DEVICES
    from .emulate import SHAPES, VARIANTS, plan, predicted_layer

    sz = SIZES[size]
    peak = DEVICES["h100"].peak("bf16")
    gemm_rate, attention_rate = 0.5 * peak, 0.3 * peak
    plan_s = {
        "setup": 60.0,  # wheels into .gpu_site (~20 s), torch + megatron + deepspeed imports
        "nccl_smoke": 15.0,
        "attention_checks": 20.0,  # CUDA context, lazy kernel loading; the cases are tiny
    }
    plan_s["matmul_peak"] = 3.0 + (sz["mm_warmup"] + sz["mm_reps"]) * 2 * sz["mm"] ** 3 / gemm_rate
    n, e = sz["eff_n"], sz["eff"]
    calls = sz["eff_warmup"] + sz["eff_reps"] + 1  # + the kernel spy's
    flops = sum(
        3 * 4 * e["h"] * e["d"] * (local * r * local + local * (local + 1) // 2)
        for local in sz["eff_local"]
        for r in (n - 1, 0)
    )
    plan_s["attention_efficiency"] = 2.0 * len(sz["eff_local"]) + calls * flops / attention_rate
    shape = SHAPES[sz["emu"]]
    calls = sz["emu_warmup"] + sz["emu_reps"] + 1  # + the untimed recorded one
    layer_s = {label: predicted_layer(VARIANTS[label], shape, "h100") for label in VARIANTS}
    plan_s["mode_emulation"] = sum(
        3.0 + calls * layer_s[label]["compute_s"] for label, _ in plan(shape)
    )
    plan_s["trainer"] = 2 * 45.0  # two subprocesses: imports, model build, 5 short steps
    return {k: round(v, 1) for k, v in plan_s.items()}


# --- 5. the trainer on the device -------------------------------------------------------------------
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


def _predict_device(device: torch.device) -> str:
    """The cost-model preset the emulation's predictions use: this GPU's kind, else h100."""
    name = torch.cuda.get_device_name(device).lower() if device.type == "cuda" else ""
    return "h200" if "h200" in name else "h100"


def _write(result: dict, path: Path) -> None:
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")


def _phase(result: dict, path: Path, name: str, fn, started: float) -> None:
    """Run one phase, unless its plan would end past `HARD_STOP_S`; record its result, or its
    error as a failure, and its measured seconds; rewrite the JSON."""
    planned = result["planned_seconds"].get(name, 0.0)
    if not result["dry_run"] and time.time() - started + planned > HARD_STOP_S:
        result["failures"].append(
            f"{name}: skipped, its plan ({planned} s) would end past {HARD_STOP_S} s"
        )
        _write(result, path)
        return
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - one failing phase must not hide the others
        result["failures"].append(f"{name}: {type(exc).__name__}: {exc}")
        result.setdefault("tracebacks", {})[name] = traceback.format_exc()[-4000:]
    result["phase_seconds"][name] = round(time.perf_counter() - t0, 2)
    _write(result, path)


def _launcher_start() -> float:
    """When launch/gpu_check.sh started (its GPU_CHECK_T0, epoch seconds), else now."""
    try:
        return float(os.environ["GPU_CHECK_T0"])
    except (KeyError, ValueError):
        return time.time()


def run(out_dir: Path, dry_run: bool = False) -> dict:
    """All phases (module doc); returns the record also written to ``out_dir/gpu_check.json``."""
    started = _launcher_start()
    size = "dry" if dry_run else "gpu"
    sz = SIZES[size]
    device = torch.device("cpu") if dry_run else torch.device("cuda", torch.cuda.current_device())
    tf32 = None
    if device.type == "cuda":  # fp32 matmuls (the trainer's fp32 runs) on tensor cores
        torch.set_float32_matmul_precision("high")
        tf32 = {
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_check.json"
    plan = planned_seconds("gpu")
    result = {
        **_environment(device),
        "dry_run": dry_run,
        "tf32": tf32,
        "planned_for": "gpu (the plan of the GPU run; the dry run measures toy sizes)",
        "planned_seconds": plan,
        "planned_total_s": round(sum(plan.values()), 1),
        "budget_s": BUDGET_S,
        "failures": [],
        "phase_seconds": {"setup": round(time.time() - started, 2)},
    }
    if sum(plan.values()) > BUDGET_S:
        result["failures"].append(
            f"plan: {sum(plan.values()):.0f} s planned, over the {BUDGET_S} s budget"
        )

    def smoke():
        r = result["nccl_smoke"] = nccl_smoke(device)
        if not r["ok"]:
            why = r.get("error") or f"the all-reduce gave {r.get('result')}"
            tail = (r.get("stderr_tail") or "").strip().splitlines()[-1:]
            result["failures"].append(f"nccl_smoke: {why}" + (f": {tail[0]}" if tail else ""))

    def checks():
        rows = result["attention_checks"] = attention_checks(device, **sz["check"])
        result["failures"] += [
            f"attention {r['case']} {r['dtype']}: kernels {r['kernels']}, "
            f"errors {r['output_rel_err']:.2e}/{r['grad_rel_err']:.2e}"
            for r in rows
            if not r["ok"]
        ]

    def peak():
        mm = result["matmul_peak"] = matmul_peak(device, sz["mm"], sz["mm_warmup"], sz["mm_reps"])
        result["matmul_peak_flops"] = mm["flops"]
        result["matmul_n"] = sz["mm"]

    def efficiency():
        result["attention_efficiency"] = []
        for local in sz["eff_local"]:
            result["attention_efficiency"] += attention_efficiency(
                device,
                result["matmul_peak_flops"],
                local,
                sz["eff_n"],
                warmup=sz["eff_warmup"],
                reps=sz["eff_reps"],
                **sz["eff"],
            )

    def emulation():
        from .emulate import table

        rows, failures = mode_emulation(device, sz, _predict_device(device))
        result["mode_emulation"] = rows
        result["mode_emulation_table"] = table(rows).splitlines()
        result["failures"] += failures
        print(table(rows), flush=True)

    def trainer():
        result["trainer"], failures = trainer_checks(out_dir, size)
        result["failures"] += failures

    for name, fn in (
        ("nccl_smoke", smoke),
        ("attention_checks", checks),
        ("matmul_peak", peak),
        ("attention_efficiency", efficiency),
        ("mode_emulation", emulation),
        ("trainer", trainer),
    ):
        _phase(result, path, name, fn, started)
    result["sdpa_kernels"] = kernel_summary(result)
    mix = kernel_mix(result, device)
    for line in mix:
        print(f"gpu_check: FAILED: {line}", file=sys.stderr, flush=True)
    result["failures"] += mix
    result["total_s"] = round(time.time() - started, 2)
    result["ok"] = not result["failures"]
    _write(result, path)
    return result


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> str | None:
    """A fresh folder, or one holding an earlier check that --overwrite replaces (its
    gpu_check.json and train/, nothing else); the error line otherwise."""
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        return f"--out-dir {out_dir} is not a folder"
    if not any(out_dir.iterdir()):
        return None
    if not overwrite:
        return (
            f"--out-dir {out_dir} is not empty; pass --overwrite to replace an earlier check "
            "there, or name a fresh folder"
        )
    (out_dir / "gpu_check.json").unlink(missing_ok=True)
    shutil.rmtree(out_dir / "train", ignore_errors=True)
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="bash launch/gpu_check.sh", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--out-dir", type=Path, required=True, help="where gpu_check.json goes")
    ap.add_argument("--dry-run", action="store_true", help="the same code on the CPU, toy sizes")
    ap.add_argument(
        "--overwrite", action="store_true", help="replace an earlier check in --out-dir"
    )
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_check: error: no CUDA device here; --dry-run runs the same code on the CPU",
            file=sys.stderr,
        )
        return 2
    problem = _prepare_out_dir(args.out_dir, args.overwrite)
    if problem:
        print(f"gpu_check: error: {problem}", file=sys.stderr)
        return 2
    result = run(args.out_dir, args.dry_run)
    print(
        json.dumps(
            {
                k: result.get(k)
                for k in (
                    "device",
                    "torch",
                    "matmul_peak_flops",
                    "ok",
                    "failures",
                    "sdpa_kernels",
                    "planned_seconds",
                    "phase_seconds",
                    "total_s",
                )
            },
            indent=2,
        )
    )
    print(f"gpu_check: wrote {args.out_dir / 'gpu_check.json'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
