"""`lss_attention` on N gloo ranks against one-process attention over the full sequence.

Tolerance 1e-5 (fp32 on CPU): the LSS kernel and the float64 dense reference differ only in fp32
accumulation order; errors seen are ~1e-6. Collectives: exactly one all-gather in forward and one
reduce-scatter in backward for N >= 2 (none for N = 1), counted twice: through `comm.record()` and
independently by wrapping every collective of `torch.distributed`.
"""

from __future__ import annotations

import pytest

from tests.support import attention_inputs, reference_attention, run_ranks

TOL = 1e-5

# (causal, h, h_kv, d, seq, b)
CASES = [
    (True, 4, 4, 16, 32, 2),  # MHA
    (False, 4, 4, 16, 32, 2),
    (True, 6, 2, 12, 24, 2),  # GQA, odd-ish head dim
    (False, 6, 2, 12, 24, 2),
    (True, 4, 1, 20, 16, 1),  # MQA
    (True, 3, 3, 7, 8, 2),  # odd head dim, odd heads
]

_DIST_FUNCS = (
    "all_gather_single",
    "all_gather_into_tensor",
    "all_gather",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "reduce_scatter",
    "all_reduce",
    "all_to_all_single",
    "broadcast",
    "send",
    "recv",
    "isend",
    "irecv",
)


class _Counter:
    """Counts every torch.distributed collective call made while installed."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.calls = []
        self.saved = {}

    def __enter__(self):
        for name in _DIST_FUNCS:
            fn = getattr(self.dist, name, None)
            if fn is None:
                continue
            self.saved[name] = fn

            def wrapped(*a, _fn=fn, _name=name, **k):
                self.calls.append(_name)
                return _fn(*a, **k)

            setattr(self.dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.dist, name, fn)


def _operator_worker(rank, world, cases):
    from lss_megatron import lss_attention
    from lss_megatron.parallel import comm

    results = []
    for case in cases:
        causal = case[0]
        q, k, v, dout = attention_inputs(case)
        ref_out, ref_dq, ref_dk, ref_dv = reference_attention(q, k, v, dout, causal)
        seg = q.shape[0] // world
        sl = slice(rank * seg, (rank + 1) * seg)
        lq, lk, lv = (t[sl].float().clone().requires_grad_(True) for t in (q, k, v))
        with comm.record() as fwd_log, _Counter() as fwd_raw:
            out = lss_attention(lq, lk, lv, causal=causal)
        with comm.record() as bwd_log, _Counter() as bwd_raw:
            out.backward(dout[sl].float())
        err = {
            "out": (out.detach().double() - ref_out[sl]).abs().max().item(),
            "dq": (lq.grad.double() - ref_dq[sl]).abs().max().item(),
            "dk": (lk.grad.double() - ref_dk[sl]).abs().max().item(),
            "dv": (lv.grad.double() - ref_dv[sl]).abs().max().item(),
        }
        sq, b, h_kv, d = lk.shape
        results.append(
            {
                "case": case,
                "err": err,
                "shape": tuple(out.shape),
                "fwd": (fwd_log.count(), fwd_log.count("all_gather", "sp"), list(fwd_raw.calls)),
                "bwd": (
                    bwd_log.count(),
                    bwd_log.count("reduce_scatter", "sp"),
                    list(bwd_raw.calls),
                ),
                "fwd_bytes": fwd_log.nbytes("sp"),
                # only the h_kv heads travel: (N-1) local [K|V] buffers
                "expected_fwd_bytes": (world - 1) * 2 * sq * b * h_kv * d * 4,
            }
        )
    return results


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, *(pytest.param(w, marks=pytest.mark.slow) for w in (1, 4))])
def test_lss_attention_matches_full_attention(world):
    per_rank = run_ranks(_operator_worker, world, CASES, timeout=240)
    for rank, results in enumerate(per_rank):
        for r in results:
            tag = f"N={world} rank={rank} case={r['case']}"
            causal, h, h_kv, d, s, b = r["case"]
            assert r["shape"] == (s // world, b, h, d), tag
            for name, e in r["err"].items():
                assert e < TOL, f"{tag}: {name} max error {e:.3e} >= {TOL}"
            expected_calls = 1 if world > 1 else 0
            fwd_total, fwd_ag, fwd_raw = r["fwd"]
            bwd_total, bwd_rs, bwd_raw = r["bwd"]
            assert (fwd_total, fwd_ag) == (expected_calls, expected_calls), f"{tag}: fwd {r['fwd']}"
            assert (bwd_total, bwd_rs) == (expected_calls, expected_calls), f"{tag}: bwd {r['bwd']}"
            assert len(fwd_raw) == expected_calls, f"{tag}: raw forward collectives {fwd_raw}"
            assert len(bwd_raw) == expected_calls, f"{tag}: raw backward collectives {bwd_raw}"
            assert r["fwd_bytes"] == r["expected_fwd_bytes"], tag
