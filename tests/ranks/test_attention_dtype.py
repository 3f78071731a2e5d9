"""LSS gathers K/V in the compute dtype: bf16 under autocast with fp32 inputs (what Megatron's
layers hand attention), or with bf16 parameters; fp32 otherwise. Counted bytes say so."""

from __future__ import annotations

from tests.support import run_ranks


def _qkv(sq, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randn(sq, 2, h, 8, generator=g).requires_grad_() for h in (4, 2, 2)]


def _gather_bytes_under_autocast(rank, world):
    import torch

    from lss_megatron.lss.operator import lss_attention
    from lss_megatron.parallel import comm

    q, k, v = _qkv(8, seed=rank)
    results = {}
    for name, ctx, params in (
        ("fp32", torch.autocast("cpu", enabled=False), None),
        ("autocast", torch.autocast("cpu", dtype=torch.bfloat16), None),
        ("bf16-params", torch.autocast("cpu", enabled=False), torch.bfloat16),
    ):
        with comm.record() as log, ctx:
            out = lss_attention(q, k, v, params_dtype=params)
        results[name] = (log.nbytes("sp"), str(out.dtype))
    return results


def test_lss_gathers_kv_in_the_compute_dtype():
    """Local [K|V] is 8 x 2 x (2+2) x 8 elements; a 2-rank all-gather sends it once: 512 x 4
    bytes in fp32, 512 x 2 in bf16 (under autocast with fp32 inputs, or with bf16 parameters)."""
    for res in run_ranks(_gather_bytes_under_autocast, 2, timeout=120):
        assert res["fp32"] == (512 * 4, "torch.float32")
        assert res["autocast"] == (512 * 2, "torch.bfloat16")
        assert res["bf16-params"] == (512 * 2, "torch.bfloat16")
