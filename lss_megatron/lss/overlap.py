"""`--lss-overlap`: LSS with its communication behind compute, exactly.

Forward, per K/V head chunk (``kv_chunks`` C, one chunk by default): the fused [K | V] gather is
launched asynchronously, the blocks whose keys this rank already holds (the diagonal block, and
under zigzag the earlier local chunk) are attended while it is in flight, then the remote key
blocks are attended from the gathered buffer and every block is merged exactly through the
log-sum-exp in fp32 (`kernel.lse_merge`, the kernel's own block merge). With C > 1 the gather of
chunk c+1 is launched before chunk c is attended.

Backward, per chunk: with the gathered K/V kept (``save_kv="gathered"``) the remote blocks go
first, their [dK | dV] reduce-scatter is launched, and the local blocks are computed while it
travels; with ``save_kv="local"`` the re-gather of chunk c+1 is launched before chunk c is
computed (its local blocks first, while chunk c's own re-gather finishes), and chunk c's
reduce-scatter travels while chunk c+1 is computed. Every wait comes as late as the data allow.

The same blocks, bytes and calls as `operator.lss_attention` without overlap (the merge order
of blocks differs, so results agree to fp32 rounding, ~1e-7), and the same bytes saved for
backward: q, the output, the fp32 log-sum-exp and the K/V (the gathered buffers, whose local
rows serve the local blocks in backward; or, with ``save_kv="local"``, the local [k | v] or the
k, v views of q's buffer, as `kv_gather.keep_local` keeps). The blocks are
`kernel.block_forward` / `block_backward`: the CPU flash kernel.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .kernel import block_backward, block_forward, flash_eligible, lse_merge
from .kv_gather import KVTransport, _same_storage


def _pieces(sq: int, r: int, n: int, layout: str) -> list[tuple[int, int, int]]:
    """This rank's token pieces: (first local row, end row, global position of the first)."""
    if layout == "contiguous":
        return [(0, sq, r * sq)]
    c = sq // 2  # zigzag: chunks r and 2N-1-r of l/(2N)
    return [(0, c, r * c), (c, sq, (2 * n - 1 - r) * c)]


def _minus(lo: int, hi: int, holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[lo, hi) without the sorted, disjoint `holes`, as ranges."""
    out, at = [], lo
    for a, b in holes:
        if a >= hi:
            break
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < hi:
        out.append((at, hi))
    return out


def block_plan(sq: int, seq: int, r: int, n: int, layout: str, causal: bool):
    """For each local query piece (rows a..e, global start g): its local key blocks (rows of the
    local k/v, causal or not) and its remote key blocks (global ranges of the gathered K/V, all
    mask-free). Together they cover exactly the keys the piece's queries see."""
    pieces = _pieces(sq, r, n, layout)
    holes = sorted((g, g + e - a) for a, e, g in pieces)
    plan = []
    for a, e, g in pieces:
        local = [
            (a2, e2, g2 == g and causal)
            for a2, e2, g2 in pieces
            if g2 == g or not causal or g2 + e2 - a2 <= g
        ]
        remote = _minus(0, g if causal else seq, holes)
        plan.append(((a, e, g), local, remote))
    return plan


def _bhsd(t: torch.Tensor) -> torch.Tensor:
    return t.permute(1, 2, 0, 3)  # [s, b, h, d] -> [b, h, s, d]


class _OverlappedLSS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, transport: KVTransport, geometry, kv_chunks: int, save_kv: str):
        r, n, layout, causal, scale = geometry
        sq, b, h, d = q.shape
        h_kv = k.shape[2]
        hc, g = h_kv // kv_chunks, h // h_kv  # kv heads per chunk, query heads per kv head
        seq = n * sq
        plan = block_plan(sq, seq, r, n, layout, causal)
        kvh = [slice(c * hc, (c + 1) * hc) for c in range(kv_chunks)]
        qh = [slice(c * hc * g, (c + 1) * hc * g) for c in range(kv_chunks)]
        out = torch.empty(b, h, sq, d, dtype=q.dtype, device=q.device)  # [b, h, sq, d]
        lse = None
        qb, kb, vb = _bhsd(q), _bhsd(k), _bhsd(v)  # [b, h(_kv), sq, d]
        pending = [transport.start(k[:, :, kvh[0]], v[:, :, kvh[0]])]
        kept = []
        for c in range(kv_chunks):
            if c + 1 < kv_chunks:  # the next chunk travels while this one is attended
                pending.append(transport.start(k[:, :, kvh[c + 1]], v[:, :, kvh[c + 1]]))
            q_c, k_c, v_c = qb[:, qh[c]], kb[:, kvh[c]], vb[:, kvh[c]]
            parts = {}
            for (a, e, _), local, _ in plan:  # the local blocks, while the gather is in flight
                parts[a] = [
                    block_forward(q_c[:, :, a:e], k_c[:, :, a2:e2], v_c[:, :, a2:e2], cz, scale)
                    for a2, e2, cz in local
                ]
            k_full, v_full = transport.finish(pending[c])  # 2 x [l, b, hc, d], global order
            kg, vg = _bhsd(k_full), _bhsd(v_full)  # [b, hc, l, d]
            for (a, e, _), _, remote in plan:
                parts[a] += [
                    block_forward(q_c[:, :, a:e], kg[:, :, s:t], vg[:, :, s:t], False, scale)
                    for s, t in remote
                ]
                o, ls = parts[a][0] if len(parts[a]) == 1 else lse_merge(parts[a])
                if lse is None:
                    lse = torch.empty(b, h, sq, dtype=ls.dtype, device=q.device)  # [b, h, sq]
                out[:, qh[c], a:e] = o.to(q.dtype)
                lse[:, qh[c], a:e] = ls
            if save_kv == "gathered":
                kept += [k_full, v_full]
            else:
                kept.append(pending[c].local)  # [s/N, b, 2*hc, d]
            pending[c] = None
        out = out.permute(2, 0, 1, 3).contiguous()  # [sq, b, h, d]
        views = save_kv == "local" and _same_storage(k, q) and _same_storage(v, q)
        if views:  # k, v share q's buffer, which is kept for q anyway: keep them, not a copy
            kept = [k, v]
        ctx.save_for_backward(q, out, lse, *kept)
        ctx.transport, ctx.plan, ctx.scale, ctx.save_kv = transport, plan, scale, save_kv
        ctx.kv_chunks, ctx.views, ctx.slices = kv_chunks, views, (kvh, qh)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, out, lse, *kept = ctx.saved_tensors
        transport, plan, scale, chunks = ctx.transport, ctx.plan, ctx.scale, ctx.kv_chunks
        kvh, qh = ctx.slices
        local = ctx.save_kv == "local"
        qb, ob, dob = _bhsd(q), _bhsd(out), _bhsd(dout)  # [b, h, sq, d]
        acc = lse.dtype
        dq = torch.zeros(qb.shape, dtype=acc, device=q.device)  # [b, h, sq, d]
        sq, b, h, d = q.shape
        h_kv = kvh[-1].stop
        dk = torch.zeros(b, h_kv, sq, d, dtype=acc, device=q.device)  # [b, h_kv, sq, d]
        dv = torch.zeros_like(dk)

        def local_kv(c):  # [s/N, b, 2*hc, d] this rank's [k | v] of chunk c
            if ctx.views:
                return torch.cat([kept[0][:, :, kvh[c]], kept[1][:, :, kvh[c]]], dim=2)
            return kept[c]

        regather = [transport.start_local(local_kv(0))] if local else None
        scatters = []
        for c in range(chunks):
            if local and c + 1 < chunks:  # the next chunk's re-gather travels meanwhile
                regather.append(transport.start_local(local_kv(c + 1)))
            q_c, o_c, do_c = qb[:, qh[c]], ob[:, qh[c]], dob[:, qh[c]]
            l_c = lse[:, qh[c]]
            hc = kvh[c].stop - kvh[c].start
            if local:  # local blocks first, from the local k, v, while the re-gather travels
                kl = local_kv(c)
                _local_blocks(
                    plan,
                    q_c,
                    o_c,
                    do_c,
                    l_c,
                    _bhsd(kl[:, :, :hc]),
                    _bhsd(kl[:, :, hc:]),
                    dq,
                    dk,
                    dv,
                    qh[c],
                    kvh[c],
                    scale,
                )
                k_full, v_full = transport.finish(regather[c])  # 2 x [l, b, hc, d]
                regather[c] = None
            else:
                k_full, v_full = kept[2 * c], kept[2 * c + 1]
            kg, vg = _bhsd(k_full), _bhsd(v_full)  # [b, hc, l, d]
            dkg = torch.zeros_like(k_full)  # [l, b, hc, d], global order
            dvg = torch.zeros_like(v_full)
            for (a, e, _), _, remote in plan:
                for s, t in remote:
                    dq_b, dk_b, dv_b = block_backward(
                        do_c[:, :, a:e],
                        q_c[:, :, a:e],
                        kg[:, :, s:t],
                        vg[:, :, s:t],
                        o_c[:, :, a:e],
                        l_c[:, :, a:e],
                        False,
                        scale,
                    )
                    dq[:, qh[c], a:e] += dq_b
                    dkg[s:t] += dk_b.permute(2, 0, 1, 3)  # [t-s, b, hc, d]
                    dvg[s:t] += dv_b.permute(2, 0, 1, 3)
            scatters.append(transport.start_reduce_scatter(dkg, dvg))  # travels meanwhile
            if not local:  # the local blocks, from the local rows of the gathered buffer
                rows = [g0 for (_, _, g0), _, _ in plan]
                _local_blocks(
                    plan, q_c, o_c, do_c, l_c, kg, vg, dq, dk, dv, qh[c], kvh[c], scale, rows
                )
        dk_out = dk.permute(2, 0, 1, 3).to(q.dtype)  # [sq, b, h_kv, d]
        dv_out = dv.permute(2, 0, 1, 3).to(q.dtype)
        for c, pending in enumerate(scatters):  # other ranks' contributions to our K/V
            dk_r, dv_r = transport.finish_reduce_scatter(pending)  # 2 x [sq, b, hc, d]
            dk_out[:, :, kvh[c]] += dk_r
            dv_out[:, :, kvh[c]] += dv_r
        dq_out = dq.permute(2, 0, 1, 3).to(q.dtype)  # [sq, b, h, d]
        return dq_out, dk_out, dv_out, None, None, None, None


def _local_blocks(plan, q_c, o_c, do_c, l_c, kl, vl, dq, dk, dv, qs, ks, scale, rows=None):
    """Backward of the local blocks of one head chunk, accumulated into dq, dk, dv (bhsd, fp32).
    `kl`, `vl` [b, hc, *, d]: the local k, v (rows = local rows), or the gathered buffer with
    `rows` the global start of each local piece (in plan order)."""
    starts = {a: (a if rows is None else rows[i]) for i, ((a, _, _), _, _) in enumerate(plan)}
    for (a, e, _), local, _ in plan:
        for a2, e2, causal in local:
            s = starts[a2]
            dq_b, dk_b, dv_b = block_backward(
                do_c[:, :, a:e],
                q_c[:, :, a:e],
                kl[:, :, s : s + e2 - a2],
                vl[:, :, s : s + e2 - a2],
                o_c[:, :, a:e],
                l_c[:, :, a:e],
                causal,
                scale,
            )
            dq[:, qs, a:e] += dq_b
            dk[:, ks, a2:e2] += dk_b
            dv[:, ks, a2:e2] += dv_b


def overlapped_lss_attention(
    q, k, v, transport: KVTransport, *, r, n, layout, causal, scale, kv_chunks=1, save_kv
):
    """q [s/N, b, h, d], k/v [s/N, b, h_kv, d] (compute dtype) -> [s/N, b, h, d], with the
    gathers and reduce-scatters overlapped (module doc). Needs the CPU flash kernel."""
    if not flash_eligible(q, k):
        raise ValueError(
            "--lss-overlap needs the CPU flash kernel (torch's private CPU flash-attention ops, "
            f"non-empty CPU tensors): got {q.dtype} on {q.device}"
        )
    geometry = (r, n, layout, causal, scale)
    return _OverlappedLSS.apply(q, k, v, transport, geometry, kv_chunks, save_kv)
