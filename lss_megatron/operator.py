"""`lss_attention`: the LSS operator (fused K/V gather + exact partial attention).

Forward, on rank r of the sequence group (N ranks, rank r holds the r-th contiguous segment):

1. fused communication: [K | V] of the local segment are concatenated and all-gathered in ONE
   collective (`comm.fused_kv_all_gather`); only the h_kv key/value heads travel;
2. partial self-attention: the local queries attend to all l keys (`attention.partial_attention`),
   causal by GLOBAL position (query r*l/N + i sees keys j <= r*l/N + i), so every softmax row is
   complete on this rank and exact without any cross-rank correction.

Backward: the adjoint of the gather is ONE reduce-scatter (sum) of [dK | dV]: rank r receives
every rank's contribution to its own K and V.

Saved for backward: q [l/N, b, h, d], the gathered K and V [l, b, h_kv, d] (views of the one
gathered buffer), the output [l/N, b, h, d] and the log-sum-exp [b, h, l/N] (fp32); see
attention.py for the per-backend detail. No [b, h, l/N, l] score tensor is stored.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist

from . import comm
from .attention import partial_attention
from .dense_attention import dense_attention


def lss_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group=None,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
    layout: str = "contiguous",
    kv_chunks: int = 1,
) -> torch.Tensor:
    """LSS partial attention over a sequence-parallel group.

    Args:
        q: local queries ``[s/N, b, h, d]`` (sbhd, as in Megatron).
        k, v: local keys and values ``[s/N, b, h_kv, d]``, ``h % h_kv == 0`` (GQA/MQA).
        group: the sequence-parallel process group (default: the whole world).
        causal: mask by global position (bottom-right aligned); False attends to every key.
        softmax_scale: defaults to ``1/sqrt(d)``.
        backend: attention kernel: ``dense`` (`dense_attention`: scores materialised) or a
            backend of `attention.partial_attention` (``auto``: the flash path).
        layout: ``contiguous`` (rank r holds segment r) or ``zigzag`` (rank r holds chunks r and
            2N-1-r of l/(2N) tokens, concatenated in that order; balances causal work).
        kv_chunks: gather K/V in this many head chunks, double-buffered (async gather of chunk
            c+1 while chunk c is attended); bounds the transient gathered/gradient buffers to one
            chunk. Same result and bytes; the one all-gather and the one reduce-scatter become
            `kv_chunks` of each.

    Returns:
        ``[s/N, b, h, d]``.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"lss_attention expects sbhd tensors: q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    sq, b, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != sq or k.shape[1] != b or k.shape[3] != d:
        raise ValueError(
            f"lss_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must both be "
            f"[s/N={sq}, b={b}, h_kv, d={d}] to match q {tuple(q.shape)}"
        )
    if h % k.shape[2]:
        raise ValueError(f"lss_attention: heads h={h} not divisible by kv heads h_kv={k.shape[2]}")
    group = group if group is not None else dist.group.WORLD
    n = comm.group_size(group)
    r = comm.group_rank(group)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)

    if layout not in ("contiguous", "zigzag"):
        raise ValueError(f"lss_attention: unknown layout {layout!r}")
    if layout == "zigzag" and sq % 2:
        raise ValueError(f"lss_attention: zigzag needs an even local length, got {sq}")

    def attend(q_, k_full, v_full):  # local queries x all keys of the gathered heads
        return _partial(q_, k_full, v_full, r, n, layout, causal, scale, backend)

    h_kv = k.shape[2]
    if kv_chunks <= 1:
        k_full, v_full = comm.fused_kv_all_gather(k, v, group)  # 2 x [s, b, h_kv, d]
        return attend(q, k_full, v_full)  # [s/N, b, h, d]
    if h_kv % kv_chunks:
        raise ValueError(f"lss_attention: kv heads {h_kv} not divisible by kv_chunks {kv_chunks}")
    # Bounded, overlapped gathers: kv heads in `kv_chunks` chunks; the gather of chunk c+1 is in
    # flight while chunk c is attended; backward reduce-scatters each chunk's gradients.
    hc = h_kv // kv_chunks  # kv heads per chunk
    qc = hc * (h // h_kv)  # query heads per chunk (GQA groups stay whole)
    chunk = [slice(c * hc, (c + 1) * hc) for c in range(kv_chunks)]
    pending = comm.start_kv_all_gather(k[:, :, chunk[0]], v[:, :, chunk[0]], group)
    outs = []
    for c in range(kv_chunks):
        k_c, v_c = k[:, :, chunk[c]], v[:, :, chunk[c]]  # [s/N, b, hc, d]
        upcoming = (comm.start_kv_all_gather(k[:, :, chunk[c + 1]], v[:, :, chunk[c + 1]], group)
                    if c + 1 < kv_chunks else None)  # fmt: skip
        k_full, v_full = comm.finish_kv_all_gather(k_c, v_c, pending)  # 2 x [s, b, hc, d]
        outs.append(attend(q[:, :, c * qc : (c + 1) * qc], k_full, v_full))  # [s/N, b, qc, d]
        pending = upcoming
    return torch.cat(outs, dim=2)  # [s/N, b, h, d]


def _partial(
    q, k_full, v_full, r: int, n: int, layout: str, causal: bool, scale: float, backend: str
) -> torch.Tensor:
    """Partial attention of this rank's queries against the gathered (rank-ordered) K/V."""
    sq = q.shape[0]
    kernel = (dense_attention if backend == "dense"
              else functools.partial(partial_attention, backend=backend))  # fmt: skip
    if layout == "contiguous":
        return kernel(
            q, k_full, v_full, q_offset=r * sq, causal=causal, softmax_scale=scale
        )  # [s/N, b, h, d]
    c = sq // 2  # zigzag chunk length l/(2N)
    perm = zigzag_gather_order(n, device=k_full.device)  # buffer chunk of each global chunk
    k_glob = k_full.view(2 * n, c, *k_full.shape[1:]).index_select(0, perm).flatten(0, 1)
    v_glob = v_full.view(2 * n, c, *v_full.shape[1:]).index_select(0, perm).flatten(0, 1)
    outs = [
        kernel(q[i * c : (i + 1) * c], k_glob, v_glob, q_offset=chunk * c, causal=causal,
               softmax_scale=scale)  # [c, b, h, d]
        for i, chunk in enumerate((r, 2 * n - 1 - r))
    ]  # fmt: skip
    return torch.cat(outs, dim=0)  # [s/N, b, h, d]


def zigzag_gather_order(n: int, device=None) -> torch.Tensor:
    """For each global chunk j of 2N, its slot in the rank-ordered gathered buffer (rank r
    contributes chunks r and 2N-1-r, in that order): j -> 2j for j < N, else 2(2N-1-j)+1."""
    j = torch.arange(2 * n, device=device)
    return torch.where(j < n, 2 * j, 2 * (2 * n - 1 - j) + 1)


def attended_pairs(
    seq_length: int, seq_rank: int, seq_size: int, causal: bool, layout: str = "contiguous"
) -> int:
    """(query, key) pairs rank `seq_rank` computes for one sequence and one head: its share of
    the attention work (causal: a query at global position i attends i + 1 keys)."""
    from .data import segment_chunks

    if not causal:
        return seq_length * seq_length // seq_size
    return sum(
        (hi - lo) * lo + (hi - lo) * (hi - lo + 1) // 2
        for lo, hi in segment_chunks(seq_length, seq_rank, seq_size, layout)
    )
