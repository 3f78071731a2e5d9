"""Attention runs in the compute dtype, whatever dtype q, k, v arrive in (attention.py doc).

Under autocast Megatron's linear layers hand attention fp32 q, k, v (the fp32 bias add after the
bf16 matmul); the kernel and, in LSS, the K/V gather must still run in bf16. Exactness: casting
fp32 inputs inside must give BITWISE the result of casting them first (same kernel, same bf16
inputs); gradients reach the fp32 inputs as fp32.
"""

from __future__ import annotations

import pytest
import torch

from lss_megatron.lss.kernel import _expand_kv_for_kernel, compute_dtype, partial_attention


def _qkv(sq=16, sk=32, h=4, h_kv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, 2, h, d, generator=g)
    k = torch.randn(sk, 2, h_kv, d, generator=g)
    v = torch.randn(sk, 2, h_kv, d, generator=g)
    return [t.requires_grad_() for t in (q, k, v)]


def test_compute_dtype_rules():
    x = torch.zeros(2)
    assert compute_dtype(x) == torch.float32
    assert compute_dtype(x, torch.bfloat16) == torch.bfloat16  # bf16 parameters, no autocast
    assert compute_dtype(x, torch.float32) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
        assert compute_dtype(x, torch.float32) == torch.bfloat16  # autocast wins


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
@pytest.mark.parametrize("q_offset", [0, 16])
def test_fp32_inputs_under_autocast_run_in_bf16(backend, q_offset):
    q, k, v = _qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = partial_attention(q, k, v, q_offset=q_offset, causal=True, backend=backend)
    assert out.dtype == torch.bfloat16
    ref = partial_attention(
        *(t.detach().bfloat16() for t in (q, k, v)), q_offset=q_offset, causal=True, backend=backend
    )
    assert torch.equal(out, ref)  # the same kernel on the same bf16 inputs
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in (q, k, v))


def test_fp32_gqa_expands_kv_only_where_the_kernel_needs_it():
    """The CUDA rule (exercised on CPU tensors): fp32 GQA repeats K/V heads to h (query head i
    uses kv head i // g); 16-bit GQA and plain MHA pass through untouched."""
    qb = torch.randn(2, 4, 5, 8)  # [b, h, sq, d]
    kb, vb = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)  # [b, h_kv, sk, d]
    kx, vx = _expand_kv_for_kernel(qb, kb, vb)
    assert kx.shape == vx.shape == (2, 4, 7, 8)
    assert torch.equal(kx[:, 3], kb[:, 1]) and torch.equal(vx[:, 2], vb[:, 1])
    k16, v16 = _expand_kv_for_kernel(qb.bfloat16(), kb.bfloat16(), vb.bfloat16())
    assert k16.shape == (2, 2, 7, 8)
    mha = torch.randn(2, 4, 7, 8)
    assert _expand_kv_for_kernel(qb, mha, mha)[0] is mha
