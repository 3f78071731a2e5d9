"""The paper's fused communication: ONE all-gather of [K | V] forward, ONE reduce-scatter of
[dK | dV] backward (the collectives themselves are `parallel.comm`'s, counted as ``sp``).

The local K and V segments of every rank of the sequence group are concatenated along the heads
and gathered in one collective; the adjoint of that gather is one reduce-scatter (sum) of the
concatenated gradients, so each rank receives every rank's contribution to its own K and V.

The gather is a start/finish pair so a caller can attend chunk c while chunk c+1 travels
(`start_kv_all_gather`, `finish_kv_all_gather`); `fused_kv_all_gather` calls the two back to back.
"""

from __future__ import annotations

import torch

from ..parallel import comm


class PendingKVGather:
    """An all-gather of one local [K | V] buffer in flight (async), finished by
    `finish_kv_all_gather`."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, group):
        if k.shape != v.shape:
            raise ValueError(f"kv gather: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
        self.group = group
        self.h_kv = k.shape[2]
        kv = torch.cat([k.detach(), v.detach()], dim=2)  # [s/N, b, 2*h_kv, d]
        # out: [s, b, 2*h_kv, d] once `work` is done
        self.out, self.work = comm.start_all_gather_dim0(kv, group, category="sp")


class _FinishKVGather(torch.autograd.Function):
    """Forward: wait for the gather, split [K | V]. Backward: ONE reduce-scatter of [dK | dV]."""

    @staticmethod
    def forward(ctx, k: torch.Tensor, v: torch.Tensor, pending: PendingKVGather):
        ctx.group, ctx.h_kv = pending.group, pending.h_kv
        if pending.work is not None:
            pending.work.wait()
        kv_full = pending.out  # [s, b, 2*h_kv, d]
        return kv_full[:, :, : ctx.h_kv], kv_full[:, :, ctx.h_kv :]  # 2 x [s, b, h_kv, d]

    @staticmethod
    def backward(ctx, dk_full: torch.Tensor | None, dv_full: torch.Tensor | None):
        if dk_full is None:
            dk_full = torch.zeros_like(dv_full)
        if dv_full is None:
            dv_full = torch.zeros_like(dk_full)
        dkv_full = torch.cat([dk_full, dv_full], dim=2)  # [s, b, 2*h_kv, d]
        dkv = comm.reduce_scatter_dim0(dkv_full, ctx.group, category="sp")  # [s/N, b, 2*h_kv, d]
        return dkv[:, :, : ctx.h_kv], dkv[:, :, ctx.h_kv :], None  # 2 x [s/N, b, h_kv, d]


def start_kv_all_gather(k: torch.Tensor, v: torch.Tensor, group) -> PendingKVGather:
    """Launch the fused [K | V] all-gather of local k, v [s/N, b, h_kv, d] asynchronously."""
    return PendingKVGather(k, v, group)


def finish_kv_all_gather(k: torch.Tensor, v: torch.Tensor, pending: PendingKVGather):
    """Wait for `pending` (started from these k, v) and return the gathered K, V
    [s, b, h_kv, d]; autograd-connected to k and v: its backward is one reduce-scatter."""
    return _FinishKVGather.apply(k, v, pending)


def fused_kv_all_gather(
    k: torch.Tensor, v: torch.Tensor, group
) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v: [s/N, b, h_kv, d] -> k_full, v_full: [s, b, h_kv, d] (views of one gathered
    buffer); backward: one reduce-scatter of [dK | dV]."""
    return finish_kv_all_gather(k, v, start_kv_all_gather(k, v, group))
