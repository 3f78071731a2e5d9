"""`ring_attention` (baselines/ring_attention.py) on N gloo ranks against one-process attention.

Tolerance 1e-5 (fp32 on CPU): the ring's blocks and the float64 reference differ only in fp32
accumulation order (blocks merged through the log-sum-exp in fp32); errors seen are ~1e-6.
Traffic: counted by `comm.record()` and independently by wrapping `torch.distributed.isend`, and
both equal the closed form: forward N-1 K/V shifts, backward N-1 K/V shifts plus N-1 [dK | dV]
shifts, each a local [K | V] block of (l/N) b 2 h_kv d elements (only the h_kv heads travel).
"""

from __future__ import annotations

import pytest

from tests.support import attention_inputs, reference_attention, run_ranks

TOL = 1e-5

# (causal, h, h_kv, d, seq, b): seq divisible by 2N for N = 2 and 4 (zigzag)
CASES = [
    (True, 4, 4, 16, 32, 2),  # MHA
    (False, 4, 4, 16, 32, 2),
    (True, 6, 2, 12, 48, 2),  # GQA
    (False, 6, 2, 12, 48, 1),
    (True, 4, 1, 8, 16, 1),  # MQA
]
RUNS = [(kernel, layout) for kernel in ("flash", "dense") for layout in ("contiguous", "zigzag")]


class _IsendBytes:
    """Bytes passed to torch.distributed.isend while installed (independent of comm.record)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.sent, self.calls = dist, 0, 0

    def __enter__(self):
        self.real = self.dist.isend

        def isend(tensor, *a, **k):
            self.sent += tensor.numel() * tensor.element_size()
            self.calls += 1
            return self.real(tensor, *a, **k)

        self.dist.isend = isend
        return self

    def __exit__(self, *exc):
        self.dist.isend = self.real


def _rows(seq: int, rank: int, n: int, layout: str):
    import torch

    from lss_megatron.layout import segment_chunks

    return torch.cat([torch.arange(lo, hi) for lo, hi in segment_chunks(seq, rank, n, layout)])


def _ring_worker(rank, world, cases, runs):
    from lss_megatron.baselines.ring_attention import ring_attention
    from lss_megatron.parallel import comm

    results = []
    for kernel, layout in runs:
        for case in cases:
            causal = case[0]
            q, k, v, dout = attention_inputs(case)
            ref_out, ref_dq, ref_dk, ref_dv = reference_attention(q, k, v, dout, causal)
            idx = _rows(q.shape[0], rank, world, layout)
            lq, lk, lv = (t[idx].float().clone().requires_grad_(True) for t in (q, k, v))
            with comm.record() as fwd_log, _IsendBytes() as fwd_raw:
                out = ring_attention(lq, lk, lv, causal=causal, kernel=kernel, layout=layout)
            with comm.record() as bwd_log, _IsendBytes() as bwd_raw:
                out.backward(dout[idx].float())
            sq, b, h_kv, d = lk.shape
            block = 2 * sq * b * h_kv * d * 4  # one local [K | V] (or [dK | dV]) block, fp32
            results.append(
                {
                    "tag": f"N={world} rank={rank} {kernel} {layout} case={case}",
                    "err": {
                        "out": (out.detach().double() - ref_out[idx]).abs().max().item(),
                        "dq": (lq.grad.double() - ref_dq[idx]).abs().max().item(),
                        "dk": (lk.grad.double() - ref_dk[idx]).abs().max().item(),
                        "dv": (lv.grad.double() - ref_dv[idx]).abs().max().item(),
                    },
                    "counted": (fwd_log.nbytes("sp"), bwd_log.nbytes("sp")),
                    "calls": (fwd_log.count("isend", "sp"), bwd_log.count("isend", "sp")),
                    "raw": (fwd_raw.sent, bwd_raw.sent, fwd_raw.calls, bwd_raw.calls),
                    "expected": ((world - 1) * block, 2 * (world - 1) * block),
                    "other": fwd_log.nbytes()
                    + bwd_log.nbytes()
                    - fwd_log.nbytes("sp")
                    - bwd_log.nbytes("sp"),
                }
            )
    return results


BF16_TOL = 3e-2
"""bf16 inputs (8-bit mantissa, relative rounding 2^-9 per value) against the float64 reference:
the blocks run in bf16 and merge in fp32, errors seen are ~5e-3 on O(1) values."""


def _bf16_worker(rank, world):
    """bf16 q, k, v through both kernels: the output is bf16, K/V and [dK | dV] travel in bf16."""

    from lss_megatron.baselines.ring_attention import ring_attention
    from lss_megatron.parallel import comm

    case = (True, 6, 2, 12, 48, 2)
    q, k, v, dout = attention_inputs(case)
    ref = reference_attention(q, k, v, dout, True)
    idx = _rows(q.shape[0], rank, world, "zigzag")
    out = {}
    for kernel in ("flash", "dense"):
        lq, lk, lv = (t[idx].bfloat16().clone().requires_grad_(True) for t in (q, k, v))
        with comm.record() as log:
            o = ring_attention(lq, lk, lv, kernel=kernel, layout="zigzag")
            o.backward(dout[idx].bfloat16())
        got = (o.detach(), lq.grad, lk.grad, lv.grad)
        out[kernel] = {
            "dtypes": [str(t.dtype) for t in got],
            "err": max(
                (g.double() - r[idx]).abs().max().item() for g, r in zip(got, ref, strict=True)
            ),
            "bytes": log.nbytes("sp"),
            "expected": 3 * (world - 1) * 2 * lk.numel() * 2,  # 3 (N-1) bf16 [K|V] blocks
        }
    return out


def _n2_worker(rank, world):
    return _ring_worker(rank, world, CASES, RUNS), _bf16_worker(rank, world)


def _check(per_rank, world):
    for results in per_rank:
        for r in results:
            tag = r["tag"]
            for name, e in r["err"].items():
                assert e < TOL, f"{tag}: {name} max error {e:.3e} >= {TOL}"
            fwd, bwd = r["expected"]
            assert r["counted"] == (fwd, bwd), f"{tag}: counted {r['counted']} != {(fwd, bwd)}"
            assert r["raw"][:2] == (fwd, bwd), f"{tag}: isend bytes {r['raw'][:2]}"
            assert r["calls"] == (world - 1, 2 * (world - 1)) == r["raw"][2:], tag
            assert r["other"] == 0, f"{tag}: traffic outside 'sp'"


@pytest.mark.timeout(300)
def test_ring_attention_n2_matches_full_attention():
    """N = 2: flash and dense, contiguous and zigzag, causal and not, MHA, GQA and MQA; and bf16
    inputs through both kernels: bf16 out and gradients, K/V and [dK | dV] travel in bf16."""
    per_rank = run_ranks(_n2_worker, 2, timeout=240)
    _check([fp32 for fp32, _ in per_rank], 2)
    for _, bf16 in per_rank:
        for kernel, r in bf16.items():
            assert r["dtypes"] == ["torch.bfloat16"] * 4, kernel
            assert r["err"] < BF16_TOL, f"{kernel}: bf16 max error {r['err']:.3e}"
            assert r["bytes"] == r["expected"], kernel


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ring_attention_n4_matches_full_attention():
    """N = 4 (zigzag and contiguous, both kernels): every step's skip pattern differs by rank."""
    _check(run_ranks(_ring_worker, 4, CASES, RUNS, timeout=360), 4)
