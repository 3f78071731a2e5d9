"""Unit tests of lss_megatron.lss.kernel.partial_attention (single process, CPU).

Every backend is compared with a dense float64 reference written here (explicit mask built from
q_offset, GQA by repeat_interleave on the head dim). Tolerance in fp32 is 1e-5 absolute for the
output and for dq/dk/dv: the kernels accumulate in fp32 in different orders (blockwise online
softmax, log-sum-exp merge of key blocks, summed GQA groups), which moves results by ~1e-7..1e-6
at these sizes, far below the 1e-5 bound, while any masking/offset/GQA mistake is O(0.1).
bf16 uses 2e-2: bf16 has an 8-bit mantissa (relative rounding 2^-9 ~ 2e-3 per value), and the
inputs, the output and the gradients are each rounded to bf16, so errors of a few 1e-3 are
expected on O(1) values.
"""

from __future__ import annotations

import logging

import pytest
import torch

import lss_megatron.lss.kernel as attn
from lss_megatron.lss.kernel import partial_attention
from lss_megatron.training.metrics import count_saved_bytes

FP32_TOL = 1e-5
BF16_TOL = 2e-2


@pytest.fixture(autouse=True)
def _no_silent_fallback(monkeypatch):
    """Fail a test if the private-op path silently fell back to sdpa during it."""
    monkeypatch.setattr(attn, "_flash_failed", False)
    yield
    assert not attn._flash_failed, "the cpu_flash path fell back to sdpa"


def reference(q, k, v, q_offset: int, causal: bool, scale: float | None = None) -> torch.Tensor:
    """Dense float64 attention: q [sq, b, h, d], k/v [sk, b, h_kv, d] -> [sq, b, h, d]."""
    sq, sk, h, d = q.shape[0], k.shape[0], q.shape[2], q.shape[3]
    g = h // k.shape[2]
    qb = q.double().permute(1, 2, 0, 3)  # [b, h, sq, d]
    kb = k.double().repeat_interleave(g, dim=2).permute(1, 2, 0, 3)  # [b, h, sk, d]
    vb = v.double().repeat_interleave(g, dim=2).permute(1, 2, 0, 3)  # [b, h, sk, d]
    scores = qb @ kb.transpose(-1, -2) * (scale if scale is not None else d**-0.5)  # [b,h,sq,sk]
    if causal:
        rows = torch.arange(sq)[:, None] + q_offset
        scores = scores.masked_fill(torch.arange(sk)[None, :] > rows, float("-inf"))  # [sq, sk]
    return (scores.softmax(-1) @ vb).permute(2, 0, 1, 3)  # [sq, b, h, d]


def make_inputs(sq, sk, b, h, h_kv, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, b, h, d, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(sk, b, h_kv, d, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(sk, b, h_kv, d, generator=gen).to(dtype).requires_grad_()
    dout = torch.randn(sq, b, h, d, generator=gen).to(dtype)
    return q, k, v, dout


def check_against_reference(backend, q, k, v, dout, q_offset, causal, tol, scale=None):
    out = partial_attention(
        q, k, v, q_offset=q_offset, causal=causal, softmax_scale=scale, backend=backend
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = reference(q, k, v, q_offset, causal, scale)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0)
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=0, msg=f"d{name}")


SEGMENTS = [(0, 8), (8, 8), (24, 8), (16, 16), (5, 7)]  # (q_offset, sq) with sk = 32
HEADS = [(2, 2), (4, 2), (4, 1)]  # MHA, GQA, MQA


@pytest.mark.parametrize("backend", ["cpu_flash", "sdpa", "math", "auto"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("h,h_kv", HEADS)
@pytest.mark.parametrize("d", [12, 20])
@pytest.mark.parametrize("q_offset,sq", SEGMENTS)
def test_matches_float64_reference(backend, causal, h, h_kv, d, q_offset, sq):
    q, k, v, dout = make_inputs(sq, 32, 2, h, h_kv, d)
    check_against_reference(backend, q, k, v, dout, q_offset, causal, FP32_TOL)


@pytest.mark.parametrize("backend", ["cpu_flash", "sdpa", "math"])
@pytest.mark.parametrize("causal", [True, False])
def test_longer_sequence_custom_scale(backend, causal):
    """Several flash/math chunks (sq > 256) in a middle segment, GQA, non-default scale."""
    q, k, v, dout = make_inputs(300, 900, 2, 4, 2, 16, seed=1)
    check_against_reference(backend, q, k, v, dout, 400, causal, FP32_TOL, scale=0.1)


@pytest.mark.parametrize("backend", ["cpu_flash", "sdpa", "math"])
def test_bf16(backend):
    q, k, v, dout = make_inputs(16, 48, 2, 4, 2, 16, dtype=torch.bfloat16, seed=2)
    check_against_reference(backend, q, k, v, dout, 24, True, BF16_TOL)


def test_fused_kv_buffer_views():
    """k and v as views of one gathered [k|v] buffer, as LSS's fused all-gather produces."""
    gen = torch.Generator().manual_seed(3)
    kv = torch.randn(32, 2, 2 * 2, 12, generator=gen).requires_grad_()  # [sk, b, 2*h_kv, d]
    k, v = kv[:, :, :2], kv[:, :, 2:]  # [sk, b, h_kv, d] views
    q = torch.randn(8, 2, 4, 12, generator=gen, requires_grad=True)
    out = partial_attention(q, k, v, q_offset=16, causal=True, backend="cpu_flash")
    ref = reference(q, k, v, 16, True)
    torch.testing.assert_close(out.double(), ref, atol=FP32_TOL, rtol=0)
    (dkv,) = torch.autograd.grad(out.sum(), kv)
    (dkv_ref,) = torch.autograd.grad(ref.sum(), kv)
    torch.testing.assert_close(dkv.double(), dkv_ref.double(), atol=FP32_TOL, rtol=0)


def test_saved_bytes_linear_in_sk():
    """cpu_flash saves q, k, v, out and lse only: far below an fp32 score tensor, linear in sk."""
    b, h, h_kv, d, sq = 1, 4, 2, 16, 512

    def saved(sk: int, backend: str) -> int:
        q, k, v, _ = make_inputs(sq, sk, b, h, h_kv, d)
        fn = partial_attention
        return count_saved_bytes(fn, q, k, v, q_offset=sk - sq, causal=True, backend=backend)

    scores_bytes = 4 * b * h * sq * 4096  # fp32 [b, h, sq, sk]
    expected = 4 * (2 * sq * b * h * d + 2 * 4096 * b * h_kv * d) + 4 * b * h * sq
    assert saved(4096, "cpu_flash") == expected
    assert expected < scores_bytes / 10
    # doubling sk with fixed sq adds exactly the extra K and V
    assert saved(8192, "cpu_flash") - saved(4096, "cpu_flash") == 4 * 2 * 4096 * b * h_kv * d
    # the sdpa path with a bottom-right mask saves a quadratic [sq, sk] mask on CPU
    assert saved(4096, "sdpa") > expected + 4 * sq * 4096 // 2


def test_auto_picks_cpu_flash(monkeypatch):
    calls = []
    real = attn._flash_fwd
    monkeypatch.setattr(attn, "_flash_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, _ = make_inputs(8, 32, 2, 4, 2, 12)
    partial_attention(q, k, v, q_offset=8, causal=True)
    assert len(calls) == 2  # prefix block + diagonal block


def _raise(*args, **kwargs):
    raise RuntimeError("simulated private-op failure")


@pytest.mark.parametrize("where", ["_flash_fwd", "_flash_bwd"])
def test_private_op_failure_falls_back(monkeypatch, caplog, where):
    monkeypatch.setattr(attn, where, _raise)
    q, k, v, dout = make_inputs(8, 32, 2, 4, 2, 12)
    with caplog.at_level(logging.WARNING, logger=attn.__name__):
        check_against_reference("cpu_flash", q, k, v, dout, 8, True, FP32_TOL)
        check_against_reference("cpu_flash", q, k, v, dout, 8, True, FP32_TOL)
    assert attn._flash_failed
    assert sum("falling back to sdpa" in r.getMessage() for r in caplog.records) == 1
    attn._flash_failed = False  # expected here; monkeypatch restores the rest


def test_rejects_bad_arguments():
    q, k, v, _ = make_inputs(8, 32, 1, 3, 2, 12)
    with pytest.raises(ValueError):
        partial_attention(q, k, v, q_offset=0, causal=False)  # 3 % 2 != 0
    q, k, v, _ = make_inputs(8, 32, 1, 2, 2, 12)
    with pytest.raises(ValueError):
        partial_attention(q, k, v, q_offset=30, causal=True)  # q_offset + sq > sk
    with pytest.raises(ValueError):
        partial_attention(q, k, v, q_offset=0, causal=True, backend="flash")
