"""Document-masked attention (Megatron-LM's ``--reset-attention-mask``), exact and block-skipping.

A packed sequence holds several documents; document boundaries are given GLOBALLY, as
``doc_start`` (LongTensor ``[b, l]``): ``doc_start[r, p]`` is the first global position of the
document that holds position ``p`` of batch row ``r`` (0, or one past the last end-of-document
token before ``p``). Every rank gets the whole ``[b, l]`` tensor from its batch (the cumulative
document lengths of the global sequence), whatever part of the sequence it holds. The query at
global position ``p`` sees keys ``doc_start[r, p] <= j <= p``: Megatron-LM's
``get_ltor_masks_and_position_ids`` mask (causal, and no key before the last EOD), which is the
serial reference (`data.documents`, tests/ranks/test_packed.py).

`document_attention(q, k, v, q_offset=, doc_start=)`: q ``[sq, b, h, d]`` holds the queries at
global positions ``q_offset + i``, k/v ``[sk, b, h_kv, d]`` the keys at global positions
``0 .. sk - 1`` (LSS's gathered K/V in global order, Ulysses' and serial's whole sequence).

* ``flash`` (the CPU flash ops of `kernel.py`): per batch row, the local queries are cut into
  TILES, one per document they meet; tile ``[a, e)`` of a document starting at ``s`` attends the
  keys ``[s, q_offset + e)`` as two mask-free/causal blocks (the prefix ``[s, q_offset + a)`` and
  the square diagonal), merged through the log-sum-exp, exactly as `kernel._CpuFlashAttention`
  does for one document. Keys of other documents are never touched: the work is the attended
  pairs ``sum_p (p - doc_start[p] + 1)`` (`document_pairs`), falling with the document length.
  Saved for backward: q, k, v, out, lse (as `kernel.py`; nothing quadratic). Tiles run one by
  one (a Python loop over rows and documents).
* ``dense`` (and the ``math`` / ``sdpa`` backends, the oracles): the ``[b, sq, sk]`` mask is
  materialised (`document_mask`); dense saves the probabilities, as `dense_attention` does.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from .dense_attention import dense_attention
from .kernel import block_backward, block_forward, flash_eligible, lse_merge, to_compute_dtype


def document_mask(doc_start: torch.Tensor, q_offset: int, sq: int, sk: int) -> torch.Tensor:
    """[b, sq, sk] bool, True = masked: key j is not in ``[doc_start[p], p]`` for the query at
    global ``p = q_offset + i``."""
    p = torch.arange(q_offset, q_offset + sq, device=doc_start.device)  # [sq]
    j = torch.arange(sk, device=doc_start.device)  # [sk]
    lo = doc_start[:, q_offset : q_offset + sq]  # [b, sq]
    return (j[None, None, :] > p[None, :, None]) | (j[None, None, :] < lo[:, :, None])


def document_pairs(doc_start: torch.Tensor, positions: torch.Tensor) -> int:
    """Attended (query, key) pairs of the queries at global `positions` ([m] long), summed over
    the batch rows: ``sum (p - doc_start[r, p] + 1)``."""
    ds = doc_start[:, positions.to(doc_start.device)]  # [b, m]
    return int((positions.to(doc_start.device)[None, :] - ds + 1).sum())


def needed_remote_keys(doc_start: torch.Tensor, held: torch.Tensor) -> int:
    """Key positions NOT in `held` (this rank's global positions, [m] long) that some query of
    `held` sees in some batch row (one K/V gather serves every row): the other ranks' keys a
    gather of only the needed K/V would bring."""
    ds = doc_start[:, held.to(doc_start.device)].amin(dim=0).cpu()  # [m]: earliest start
    length = doc_start.shape[1]
    need = torch.zeros(length + 1, dtype=torch.long)
    hp = held.cpu()
    need.index_add_(0, ds, torch.ones_like(ds))  # +1 at each interval start
    need.index_add_(0, hp + 1, -torch.ones_like(hp))  # -1 after each interval end
    seen = need.cumsum(0)[:length] > 0  # [l]: positions inside some [ds[p], p]
    seen[hp] = False
    return int(seen.sum())


def _tiles(doc_start: torch.Tensor, q_offset: int, sq: int) -> list[tuple[int, int, int, int]]:
    """(row, a, e, s): local queries [a, e) of batch row `row` belong to the document starting at
    global position s (one tile per document the local queries meet)."""
    ds = doc_start[:, q_offset : q_offset + sq].cpu()  # [b, sq]
    out = []
    for r in range(ds.shape[0]):
        row = ds[r]
        cuts = ((row[1:] != row[:-1]).nonzero().flatten() + 1).tolist()
        for a, e in zip([0, *cuts], [*cuts, sq], strict=True):
            out.append((r, a, e, int(row[a])))
    return out


def _tile_blocks(q_offset: int, a: int, e: int, s: int) -> list[tuple[int, int, bool]]:
    """Key blocks (start, end, causal) of one tile: the prefix of its document, the diagonal."""
    prefix = [(s, q_offset + a, False)] if s < q_offset + a else []
    return prefix + [(q_offset + a, q_offset + e, True)]


class _DocFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_offset: int, tiles, scale: float):
        qb = q.permute(1, 2, 0, 3)  # [b, h, sq, d]
        kb, vb = k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)  # [b, h_kv, sk, d]
        b, h, sq, d = qb.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        out = torch.empty(b, h, sq, d, dtype=q.dtype, device=q.device)  # [b, h, sq, d]
        lse = torch.empty(b, h, sq, dtype=acc, device=q.device)  # [b, h, sq]
        for r, a, e, s in tiles:
            qt = qb[r : r + 1, :, a:e]  # [1, h, e-a, d]
            parts = [
                block_forward(qt, kb[r : r + 1, :, k0:k1], vb[r : r + 1, :, k0:k1], c, scale)
                for k0, k1, c in _tile_blocks(q_offset, a, e, s)
            ]
            o, lt = parts[0] if len(parts) == 1 else lse_merge(parts)  # [1, h, e-a, d], [1, h, e-a]
            out[r : r + 1, :, a:e] = o
            lse[r : r + 1, :, a:e] = lt
        out = out.permute(2, 0, 1, 3).contiguous()  # [sq, b, h, d]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.q_offset, ctx.tiles, ctx.scale = q_offset, tiles, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        qb, ob, dob = (t.permute(1, 2, 0, 3) for t in (q, out, dout))  # [b, h, sq, d]
        kb, vb = k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)  # [b, h_kv, sk, d]
        dq = torch.zeros(qb.shape, dtype=lse.dtype, device=q.device)  # [b, h, sq, d]
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)  # [sk, b, h_kv, d]
        dkb, dvb = dk.permute(1, 2, 0, 3), dv.permute(1, 2, 0, 3)  # [b, h_kv, sk, d]
        for r, a, e, s in ctx.tiles:
            rows, qs = slice(r, r + 1), slice(a, e)
            for k0, k1, c in _tile_blocks(ctx.q_offset, a, e, s):
                dq_b, dk_b, dv_b = block_backward(
                    dob[rows, :, qs],
                    qb[rows, :, qs],
                    kb[rows, :, k0:k1],
                    vb[rows, :, k0:k1],
                    ob[rows, :, qs],
                    lse[rows, :, qs],
                    c,
                    ctx.scale,
                )
                dq[rows, :, qs] += dq_b
                dkb[rows, :, k0:k1] += dk_b
                dvb[rows, :, k0:k1] += dv_b
        return dq.permute(2, 0, 1, 3).to(q.dtype), dk, dv, None, None, None  # dq [sq, b, h, d]


def _masked_sdpa(q, k, v, mask, scale):
    """F.scaled_dot_product_attention with a [b, sq, sk] (True = masked) document mask."""
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, h or h_kv, s, d]
    if qb.shape[1] != kb.shape[1]:
        g = qb.shape[1] // kb.shape[1]
        kb, vb = kb.repeat_interleave(g, 1), vb.repeat_interleave(g, 1)  # [b, h, sk, d]
    out = torch.nn.functional.scaled_dot_product_attention(
        qb, kb, vb, attn_mask=~mask[:, None], scale=scale
    )  # [b, h, sq, d]
    return out.permute(2, 0, 1, 3)  # [sq, b, h, d]


def document_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_offset: int,
    doc_start: torch.Tensor,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention within documents (module doc); q [sq, b, h, d], k/v [sk, b, h_kv, d] ->
    [sq, b, h, d]. `backend`: ``auto``/``cpu_flash`` (tiles), ``dense`` (`dense_attention` with
    the mask), ``sdpa`` / ``math`` (masked oracles)."""
    sq, b, h, d = q.shape
    sk = k.shape[0]
    if doc_start.dim() != 2 or doc_start.shape[0] != b or doc_start.shape[1] < q_offset + sq:
        raise ValueError(
            f"document attention: doc_start {tuple(doc_start.shape)} must be [b={b}, l >= "
            f"{q_offset + sq}] (the document start of every global position)"
        )
    if not (0 <= q_offset and q_offset + sq <= sk):
        raise ValueError(
            f"document attention needs 0 <= q_offset, q_offset + sq <= sk ({q_offset=})"
        )
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    k, v = k[: q_offset + sq], v[: q_offset + sq]  # later keys are never visible
    if backend == "dense":
        mask = document_mask(doc_start, q_offset, sq, q_offset + sq)  # [b, sq, sk]
        return dense_attention(
            q, k, v, q_offset=q_offset, causal=True, softmax_scale=scale, mask=mask
        )
    q, k, v = to_compute_dtype(q, k, v)
    with torch.autocast(q.device.type, enabled=False):
        if backend in ("auto", "cpu_flash") and flash_eligible(q, k):
            tiles = _tiles(doc_start, q_offset, sq)
            return _DocFlashAttention.apply(q, k, v, q_offset, tiles, scale)
        if backend == "cpu_flash":
            raise ValueError("cpu_flash needs non-empty CPU tensors and the private CPU flash ops")
        mask = document_mask(doc_start, q_offset, sq, q_offset + sq)  # [b, sq, sk]
        if backend == "math":
            return dense_attention(
                q, k, v, q_offset=q_offset, causal=True, softmax_scale=scale, mask=mask
            )
        return _masked_sdpa(q, k, v, mask, scale)
