"""The dense attention kernel of LSS and Ulysses (``--attention-kernel dense``): scores
materialised and probabilities saved, the maths of Megatron-Core's local `DotProductAttention`.

`dense_attention(q [sq, b, h, d], k/v [sk, b, h_kv, d], q_offset, causal, softmax_scale)`
computes what `DotProductAttention` computes (serial and nvidia-sp run Megatron's own class),
generalised to queries at global positions ``q_offset + i`` (LSS's ``[l/N, l]`` block of rank r:
q_offset = r l/N; Ulysses: q_offset = 0 on h/N heads):

1. q, k and v are laid out as contiguous ``[b h_kv, g sq, d]`` and ``[b h_kv, sk, d]`` copies
   (g = h / h_kv query heads per key/value head fold into the query length, so grouped heads
   share k and v without expanding them); scores = q k^T * scale, ``[b, h_kv, g, sq, sk]``;
2. Megatron's `FusedScaleMaskSoftmax` torch path: bf16/fp16 scores go to fp32 first
   (``attention_softmax_in_fp32=True``, Megatron's default), masked keys (``j > q_offset + i``)
   are filled with -10000 (`attention_mask_func`), softmax, probabilities back to the input dtype;
3. context = probs v -> ``[sq, b, h, d]``.

Saved for backward (es = element size of q): the q, k and v copies (``sq b h d``, ``sk b h_kv d``
each, es), the probabilities ``[b, h, sq, sk]`` (es, plus their fp32 original for bf16 inputs)
and the causal mask ``[sq, sk]`` (bool): quadratic in the keys. The output is not saved.
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
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, materialised; q [sq, b, h, d], k/v [sk, b, h_kv, d] ->
    [sq, b, h, d]. `mask` ([b, sq, sk] bool, True = masked; the document mask of
    `documents.document_mask`) replaces the causal mask when given."""
    sq, b, h, d = q.shape
    sk, h_kv = k.shape[0], k.shape[2]
    if k.shape != v.shape or k.shape[1] != b or k.shape[3] != d or h % h_kv:
        raise ValueError(f"bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if causal and not (0 <= q_offset and q_offset + sq <= sk):
        raise ValueError(f"causal needs 0 <= q_offset and q_offset + sq <= sk ({q_offset=})")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    g = h // h_kv
    # always copies (also when a permute happens to be contiguous): what is saved is predictable
    bhsd = {"memory_format": torch.contiguous_format}
    qb = q.permute(1, 2, 0, 3).clone(**bhsd).view(b * h_kv, g * sq, d)  # [b*h_kv, g*sq, d]
    kb = k.permute(1, 2, 0, 3).clone(**bhsd).view(b * h_kv, sk, d)  # [b*h_kv, sk, d]
    vb = v.permute(1, 2, 0, 3).clone(**bhsd).view(b * h_kv, sk, d)  # [b*h_kv, sk, d]
    scores = torch.bmm(qb, kb.transpose(1, 2)) * scale  # [b*h_kv, g*sq, sk]
    half = q.dtype in (torch.float16, torch.bfloat16)
    x = scores.view(b, h_kv, g, sq, sk)  # [b, h_kv, g, sq, sk]
    x = x.float() if half else x
    if mask is not None:
        x = x.masked_fill_(mask[:, None, None], MASKED_SCORE)  # [b, 1, 1, sq, sk]
    elif causal:
        x = x.masked_fill_(causal_mask(sq, sk, q_offset, q.device), MASKED_SCORE)
    probs = torch.nn.functional.softmax(x, dim=-1)  # [b, h_kv, g, sq, sk]
    if half:
        probs = probs.to(q.dtype)
    context = torch.bmm(probs.view(b * h_kv, g * sq, sk), vb)  # [b*h_kv, g*sq, d]
    return context.view(b, h, sq, d).permute(2, 0, 1, 3)  # [sq, b, h, d]


# --- the dense kernel as blocks merged through the log-sum-exp (the ring's dense kernel) ---------
def _fold(x: torch.Tensor, h_kv: int, acc: torch.dtype) -> torch.Tensor:
    """[b, h, sq, ...] -> [b, h_kv, g*sq, ...] in `acc` (the g query heads of a kv head fold into
    the query length, so they share k and v without expanding them)."""
    b, h, sq = x.shape[:3]
    return x.to(acc).reshape(b, h_kv, (h // h_kv) * sq, *x.shape[3:])


def _block_scores(qf, kf, sq: int, causal: bool, scale: float) -> torch.Tensor:
    """Scores of folded queries qf [b, h_kv, g*sq, d] against kf [b, h_kv, n, d], masked (-inf)
    above the diagonal of a square causal block -> [b, h_kv, g*sq, n]."""
    s = (qf @ kf.transpose(-1, -2)) * scale  # [b, h_kv, g*sq, n]
    if causal:
        g = qf.shape[2] // sq
        mask = causal_mask(sq, kf.shape[2], 0, qf.device).repeat(g, 1)  # [g*sq, n]
        s = s.masked_fill(mask, float("-inf"))
    return s


def dense_block_forward(qb, kb, vb, causal: bool, scale: float):
    """One attention block with its scores materialised, in bhsd: qb [b, h, sq, d], kb/vb
    [b, h_kv, n, d] -> out [b, h, sq, d], lse [b, h, sq], both in fp32 (fp64 for fp64 inputs).
    `causal`: a square diagonal block (query i sees keys j <= i). The counterpart of
    `kernel.block_forward` for ``--attention-kernel dense`` (merged with `kernel.lse_merge`)."""
    b, h, sq, d = qb.shape
    h_kv = kb.shape[1]
    acc = torch.promote_types(qb.dtype, torch.float32)
    s = _block_scores(_fold(qb, h_kv, acc), kb.to(acc), sq, causal, scale)  # [b, h_kv, g*sq, n]
    lse = s.logsumexp(-1)  # [b, h_kv, g*sq]
    out = (s - lse.unsqueeze(-1)).exp() @ vb.to(acc)  # [b, h_kv, g*sq, d]
    return out.reshape(b, h, sq, d), lse.reshape(b, h, sq)


def dense_block_backward(dout, qb, kb, vb, out, lse, causal: bool, scale: float):
    """Gradients of one block (shapes as `dense_block_forward`), recomputing its scores; `out`
    and `lse` are the merged output and log-sum-exp of the rows (``D = rowsum(dO * O)``) ->
    dq [b, h, sq, d], dk/dv [b, h_kv, n, d] in fp32 (fp64 for fp64 inputs)."""
    b, h, sq, d = qb.shape
    h_kv = kb.shape[1]
    acc = torch.promote_types(qb.dtype, torch.float32)
    qf, dof, of = (_fold(t, h_kv, acc) for t in (qb, dout, out))  # [b, h_kv, g*sq, d]
    kf, vf = kb.to(acc), vb.to(acc)  # [b, h_kv, n, d]
    s = _block_scores(qf, kf, sq, causal, scale)  # [b, h_kv, g*sq, n]
    p = (s - _fold(lse, h_kv, acc).unsqueeze(-1)).exp()  # probabilities under the merged lse
    dv = p.transpose(-1, -2) @ dof  # [b, h_kv, n, d]
    dp = dof @ vf.transpose(-1, -2)  # [b, h_kv, g*sq, n]
    ds = p * (dp - (dof * of).sum(-1, keepdim=True))  # [b, h_kv, g*sq, n]
    dq = (ds @ kf) * scale  # [b, h_kv, g*sq, d]
    dk = (ds.transpose(-1, -2) @ qf) * scale  # [b, h_kv, n, d]
    return dq.reshape(b, h, sq, d), dk, dv
