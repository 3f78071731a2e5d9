"""The dense attention kernel of LSS and Ulysses (`lss.dense_attention.dense_attention`), one
process: against a float64 reference written here (explicit mask from q_offset, GQA by
repeat_interleave), and what it saves for backward, counted per storage.

Tolerances: fp32 1e-5 absolute on outputs and gradients (fp32 accumulation in another order than
the float64 reference: ~1e-7 seen); bf16 2e-2 (8 mantissa bits; inputs, output and gradients are
each rounded to bf16, errors of a few 1e-3 on O(1) values).
"""

from __future__ import annotations

import pytest
import torch

from lss_megatron.lss.dense_attention import dense_attention
from lss_megatron.training.metrics import count_saved_bytes


def reference(q, k, v, q_offset: int, causal: bool) -> torch.Tensor:
    """float64 softmax(q k^T / sqrt(d) + mask) v: q [sq, b, h, d], k/v [sk, b, h_kv, d]."""
    sq, sk, h, d = q.shape[0], k.shape[0], q.shape[2], q.shape[3]
    g = h // k.shape[2]
    qb = q.double().permute(1, 2, 0, 3)  # [b, h, sq, d]
    kb = k.double().repeat_interleave(g, dim=2).permute(1, 2, 0, 3)  # [b, h, sk, d]
    vb = v.double().repeat_interleave(g, dim=2).permute(1, 2, 0, 3)  # [b, h, sk, d]
    scores = qb @ kb.transpose(-1, -2) * d**-0.5  # [b, h, sq, sk]
    if causal:
        rows = torch.arange(sq)[:, None] + q_offset
        scores = scores.masked_fill(torch.arange(sk)[None, :] > rows, float("-inf"))  # [sq, sk]
    return (scores.softmax(-1) @ vb).permute(2, 0, 1, 3)  # [sq, b, h, d]


def inputs(sq, sk, b, h, h_kv, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, b, h, d, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(sk, b, h_kv, d, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(sk, b, h_kv, d, generator=gen).to(dtype).requires_grad_()
    return q, k, v, torch.randn(sq, b, h, d, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("h,h_kv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("q_offset,sq", [(0, 32), (8, 8), (24, 8), (5, 7)])
def test_matches_float64_reference(dtype, tol, causal, h, h_kv, q_offset, sq):
    q, k, v, dout = inputs(sq, 32, 2, h, h_kv, 12, dtype)
    out = dense_attention(q, k, v, q_offset=q_offset, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = reference(q, k, v, q_offset, causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0)
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=0, msg=f"d{name}")


@pytest.mark.parametrize("dtype,es,extra", [(torch.float32, 4, 0), (torch.bfloat16, 2, 4)])
def test_saves_copies_probabilities_and_mask(dtype, es, extra):
    """Counted: copies of q [sq b h d] and of k, v [sk b h_kv d], the probabilities
    [b, h, sq, sk] (bf16: also Megatron's fp32 softmax output) and the bool mask [sq, sk]."""
    sq, sk, b, h, h_kv, d = 16, 64, 2, 4, 2, 8
    q, k, v, _ = inputs(sq, sk, b, h, h_kv, d, dtype)
    saved = count_saved_bytes(dense_attention, q, k, v, q_offset=sk - sq, causal=True)
    want = (sq * b * h * d + 2 * sk * b * h_kv * d) * es + b * h * sq * sk * (es + extra)
    assert saved == want + sq * sk  # + the causal mask, one byte per pair
