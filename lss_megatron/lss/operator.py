"""`lss_attention`: the LSS operator (fused K/V gather + exact partial attention).

Forward, on rank r of the sequence group (N ranks, rank r holds the r-th contiguous segment):

1. fused communication: [K | V] of the local segment are concatenated and all-gathered in ONE
   collective (`kv_gather.fused_kv_all_gather`); only the h_kv key/value heads travel;
2. partial self-attention: the local queries attend to all l keys (`kernel.partial_attention`),
   causal by GLOBAL position (query r*l/N + i sees keys j <= r*l/N + i), so every softmax row is
   complete on this rank and exact without any cross-rank correction.

Backward: the adjoint of the gather is ONE reduce-scatter (sum) of [dK | dV]: rank r receives
every rank's contribution to its own K and V.

Saved for backward: q [l/N, b, h, d], the gathered K and V [l, b, h_kv, d] (views of the one
gathered buffer), the output [l/N, b, h, d] and the log-sum-exp [b, h, l/N] (fp32); see
kernel.py for the per-backend detail. No [b, h, l/N, l] score tensor is stored.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist

from ..layout import LAYOUTS
from ..parallel import comm
from .dense_attention import dense_attention
from .documents import document_attention
from .kernel import partial_attention, to_compute_dtype
from .kv_gather import (  # noqa: F401 - zigzag_permutation: re-exported
    SAVE_KV,
    KVTransport,
    finish_kv_all_gather,
    keep_local,
    zigzag_permutation,
)
from .overlap import overlapped_lss_attention


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
    params_dtype: torch.dtype | None = None,
    save_kv: str = "gathered",
    fused: bool = True,
    overlap: bool = False,
    doc_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """LSS partial attention over a sequence-parallel group.

    Args:
        q: local queries ``[s/N, b, h, d]`` (sbhd, as in Megatron).
        k, v: local keys and values ``[s/N, b, h_kv, d]``, ``h % h_kv == 0`` (GQA/MQA).
        group: the sequence-parallel process group (default: the whole world).
        causal: mask by global position (bottom-right aligned); False attends to every key.
        softmax_scale: defaults to ``1/sqrt(d)``.
        params_dtype: the model's parameter dtype; q, k, v are cast to `kernel.compute_dtype`
            (the autocast dtype under autocast, else a 16-bit `params_dtype`, else theirs) BEFORE
            the K/V gather, so K/V travel and attention runs in the compute dtype; the result is
            in that dtype.
        backend: attention kernel: ``dense`` (`dense_attention`: scores materialised) or a
            backend of `kernel.partial_attention` (``auto``: the flash path).
        layout: ``contiguous`` (rank r holds segment r) or ``zigzag`` (rank r holds chunks r and
            2N-1-r of l/(2N) tokens, concatenated in that order; balances causal work).
        kv_chunks: gather K/V in this many head chunks, double-buffered (async gather of chunk
            c+1 while chunk c is attended); bounds the transient gathered/gradient buffers to one
            chunk. Same result and bytes; the one all-gather and the one reduce-scatter become
            `kv_chunks` of each.
        save_kv: ``gathered`` (the paper: autograd keeps the gathered K/V) or ``local`` (it keeps
            this rank's k, v and backward re-gathers them: one more gather per layer, (N-1)/N of
            the gathered K/V bytes not kept; `kv_gather.keep_local`).
        fused: gather [K | V] in one collective (the paper); False gathers K and V in two calls
            each way (Megatron-Core's all_gather CP): the same bytes, twice the calls.
        overlap: attend the local blocks while the gather is in flight and merge the remote
            ones through the log-sum-exp; in backward, reduce-scatter while the rest computes
            (`overlap.overlapped_lss_attention`; the CPU flash kernel). Same result and bytes.
        doc_start: packed documents (Megatron-LM's ``--reset-attention-mask``): LongTensor
            ``[b, l]``, the global start of the document of every GLOBAL position (the same on
            every rank); queries attend only inside their document, and key blocks of other
            documents are skipped (`documents.document_attention`). Needs ``causal``.

    Returns:
        ``[s/N, b, h, d]``.
    """
    _check_inputs(q, k, v, layout, kv_chunks, save_kv)
    q, k, v = to_compute_dtype(q, k, v, params_dtype)  # before the gather: K/V travel in it
    group = group if group is not None else dist.group.WORLD
    n = comm.group_size(group)
    r = comm.group_rank(group)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[3])
    zigzag_n = n if layout == "zigzag" and n > 1 else None
    transport = KVTransport(group, fused=fused, zigzag_n=zigzag_n)  # K/V arrive in global order

    if overlap:
        if backend == "dense" or doc_start is not None:
            raise ValueError("lss_attention: overlap needs the flash kernel and no document mask")
        return overlapped_lss_attention(
            q,
            k,
            v,
            transport,
            r=r,
            n=n,
            layout=layout,
            causal=causal,
            scale=scale,
            kv_chunks=kv_chunks,
            save_kv=save_kv,
        )  # [s/N, b, h, d]

    def attend(q_, k_full, v_full):  # local queries x all keys of the gathered heads
        return _partial(q_, k_full, v_full, r, n, layout, causal, scale, backend, doc_start)

    # save_kv="local": the gathered K/V are not kept for backward (re-gathered there)
    with keep_local(save_kv == "local" and torch.is_grad_enabled()) as local:
        if kv_chunks <= 1:
            pending = transport.start(k, v)
            k_full, v_full = finish_kv_all_gather(k, v, pending)  # 2 x [s, b, h_kv, d]
            if local is not None:
                local.add(k_full, v_full, pending, k, v, q)
            return attend(q, k_full, v_full)  # [s/N, b, h, d]
        # Bounded, overlapped gathers: kv heads in `kv_chunks` chunks; the gather of chunk c+1 is
        # in flight while chunk c is attended; backward reduce-scatters each chunk's gradients.
        h, h_kv = q.shape[2], k.shape[2]
        hc = h_kv // kv_chunks  # kv heads per chunk
        qc = hc * (h // h_kv)  # query heads per chunk (GQA groups stay whole)
        chunk = [slice(c * hc, (c + 1) * hc) for c in range(kv_chunks)]
        pending = transport.start(k[:, :, chunk[0]], v[:, :, chunk[0]])
        outs = []
        for c in range(kv_chunks):
            k_c, v_c = k[:, :, chunk[c]], v[:, :, chunk[c]]  # [s/N, b, hc, d]
            upcoming = (
                transport.start(k[:, :, chunk[c + 1]], v[:, :, chunk[c + 1]])
                if c + 1 < kv_chunks
                else None
            )
            k_full, v_full = finish_kv_all_gather(k_c, v_c, pending)  # 2 x [s, b, hc, d]
            if local is not None:
                local.add(k_full, v_full, pending, k_c, v_c, q)
            outs.append(attend(q[:, :, c * qc : (c + 1) * qc], k_full, v_full))  # [s/N, b, qc, d]
            pending = upcoming
        return torch.cat(outs, dim=2)  # [s/N, b, h, d]


def _check_inputs(q, k, v, layout: str, kv_chunks: int, save_kv: str = "gathered") -> None:
    """Raise ValueError naming the shapes or options `lss_attention` cannot take."""
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
    h_kv = k.shape[2]
    if h % h_kv:
        raise ValueError(f"lss_attention: heads h={h} not divisible by kv heads h_kv={h_kv}")
    if layout not in LAYOUTS:
        raise ValueError(f"lss_attention: unknown layout {layout!r}")
    if layout == "zigzag" and sq % 2:
        raise ValueError(f"lss_attention: zigzag needs an even local length, got {sq}")
    if kv_chunks > 1 and h_kv % kv_chunks:
        raise ValueError(f"lss_attention: kv heads {h_kv} not divisible by kv_chunks {kv_chunks}")
    if save_kv not in SAVE_KV:
        raise ValueError(f"lss_attention: save_kv {save_kv!r} is not one of {SAVE_KV}")


def _partial(
    q,
    k_full,
    v_full,
    r: int,
    n: int,
    layout: str,
    causal: bool,
    scale: float,
    backend: str,
    doc_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Partial attention of this rank's queries against the gathered (rank-ordered) K/V."""
    sq = q.shape[0]
    if doc_start is not None:
        if not causal:
            raise ValueError("lss_attention: document masks (doc_start) need causal attention")

        def kernel(q_, k_, v_, *, q_offset, causal, softmax_scale):
            return document_attention(
                q_,
                k_,
                v_,
                q_offset=q_offset,
                doc_start=doc_start,
                softmax_scale=softmax_scale,
                backend=backend,
            )
    else:
        kernel = (
            dense_attention
            if backend == "dense"
            else functools.partial(partial_attention, backend=backend)
        )
    if layout == "contiguous":
        return kernel(
            q, k_full, v_full, q_offset=r * sq, causal=causal, softmax_scale=scale
        )  # [s/N, b, h, d]
    c = sq // 2  # zigzag chunk length l/(2N); k_full/v_full arrive in global order
    outs = [
        kernel(
            q[i * c : (i + 1) * c],
            k_full,
            v_full,
            q_offset=chunk * c,
            causal=causal,
            softmax_scale=scale,
        )  # [c, b, h, d]
        for i, chunk in enumerate((r, 2 * n - 1 - r))
    ]
    return torch.cat(outs, dim=0)  # [s/N, b, h, d]
