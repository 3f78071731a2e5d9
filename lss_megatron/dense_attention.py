"""The dense attention kernel: scores materialised, probabilities saved (``--attention-kernel
dense``), with the semantics of Megatron-Core's local `DotProductAttention` (unfused path).

`dense_attention(q [sq, b, h, d], k/v [sk, b, h_kv, d], q_offset, causal, softmax_scale)` is what
`DotProductAttention.forward` computes, generalised to queries at global positions
``q_offset + i`` (LSS's ``[l/N, l]`` block of rank r: q_offset = r l/N) so LSS and Ulysses run the
same dense maths as serial and nvidia-sp:

1. GQA: k and v are expanded to h heads with ``repeat_interleave`` (copies, as Megatron does);
2. scores = ``baddbmm(empty, q, k^T, beta=0, alpha=scale)`` -> ``[b*h, sq, sk]``;
3. Megatron's `FusedScaleMaskSoftmax` torch path: bf16/fp16 scores go to fp32 first
   (``attention_softmax_in_fp32=True``, Megatron's default), masked keys (``j > q_offset + i``)
   are filled with -10000 (`attention_mask_func`), softmax, probabilities back to the input dtype;
4. context = ``bmm(probs, v)`` -> ``[sq, b, h, d]``.

Saved for backward (es = element size of q): q (a copy when the head split needs one), the
expanded k and v (views when h == h_kv), the probabilities ``[b, h, sq, sk]`` (es, plus their
fp32 original for bf16 inputs) and the causal mask ``[sq, sk]`` (bool): quadratic in the keys.
"""

from __future__ import annotations

import math

import torch

MASKED_SCORE = -10000.0
"""What Megatron's `attention_mask_func` writes into masked scores."""


def causal_mask(sq: int, sk: int, q_offset: int, device=None) -> torch.Tensor:
    """[sq, sk] bool, True = masked: key j is invisible to the query at global q_offset + i."""
    rows = torch.arange(sq, device=device)[:, None] + q_offset  # [sq, 1]
    return torch.arange(sk, device=device)[None, :] > rows  # [sq, sk]


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_offset: int,
    causal: bool,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, materialised; q [sq, b, h, d], k/v [sk, b, h_kv, d] ->
    [sq, b, h, d]."""
    sq, b, h, d = q.shape
    sk, h_kv = k.shape[0], k.shape[2]
    if k.shape != v.shape or k.shape[1] != b or k.shape[3] != d or h % h_kv:
        raise ValueError(f"bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if causal and not (0 <= q_offset and q_offset + sq <= sk):
        raise ValueError(f"causal needs 0 <= q_offset and q_offset + sq <= sk ({q_offset=})")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    if h // h_kv > 1:
        k = k.repeat_interleave(h // h_kv, dim=2)  # [sk, b, h, d]
        v = v.repeat_interleave(h // h_kv, dim=2)  # [sk, b, h, d]
    qb = q.reshape(sq, b * h, d)  # [sq, b*h, d]
    kb = k.view(sk, b * h, d)  # [sk, b*h, d]
    scores = torch.baddbmm(
        torch.empty(b * h, sq, sk, dtype=q.dtype, device=q.device),
        qb.transpose(0, 1),  # [b*h, sq, d]
        kb.transpose(0, 1).transpose(1, 2),  # [b*h, d, sk]
        beta=0.0,
        alpha=scale,
    ).view(b, h, sq, sk)  # [b, h, sq, sk]
    half = q.dtype in (torch.float16, torch.bfloat16)
    x = scores.float() if half else scores
    if causal:
        x = x.masked_fill_(causal_mask(sq, sk, q_offset, q.device), MASKED_SCORE)
    probs = torch.nn.functional.softmax(x, dim=-1)  # [b, h, sq, sk]
    if half:
        probs = probs.to(q.dtype)
    context = torch.bmm(probs.view(b * h, sq, sk), v.view(sk, b * h, d).transpose(0, 1))
    return context.view(b, h, sq, d).permute(2, 0, 1, 3).contiguous()  # [sq, b, h, d]
