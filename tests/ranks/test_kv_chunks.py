"""Bounded, overlapped K/V gathers (`--kv-gather-chunks C`): exact, same bytes, lower peak; and
how K/V are kept and travel (`--lss-save-kv local`, `--lss-kv-gather separate`), alone and
composed with the chunks and the zigzag layout.

Exactness as everywhere (fp32 on CPU, 1e-5 against a float64 one-process reference: only the
accumulation order differs). Communication: the one all-gather and one reduce-scatter become C
of each, moving exactly the same bytes. Memory: the bytes saved for backward are unchanged (every
chunk's gathered K/V is kept for backward); what drops is the transient peak (the concatenated
buffers and full-length gradient buffers now exist one chunk at a time), measured as the peak
heap in use during one forward + backward (analysis/kv_chunks_memory.py).

`save_kv="local"` keeps this rank's k, v instead of the gathered K/V and re-gathers in backward:
sp bytes exactly 1.5x (one more gather of the same size), and the bytes saved for backward
(counted by `metrics.saved_storages`, unique storages) drop by exactly (N-1)/N of the gathered
K/V, ``(N-1)/N * 2 l b h_kv d es``. ``separate`` gathers K and V in two calls each way: the same
bytes, twice the calls.
"""

from __future__ import annotations

import pytest

from tests.support import attention_inputs, reference_attention, run_ranks

TOL = 1e-5


def _worker(rank, world, cases):
    import torch

    from lss_megatron import lss_attention
    from lss_megatron.lss.positions import local_positions
    from lss_megatron.parallel import comm
    from lss_megatron.training.metrics import saved_storages

    out = []
    for case, chunks, layout, *variant in cases:
        opts = dict(variant[0]) if variant else {}
        one_buffer = opts.pop("qkv_buffer", False)  # q, k, v views of one buffer, as Megatron's
        causal = case[0]
        q, k, v, dout = attention_inputs(case)
        ref_out, ref_dq, ref_dk, ref_dv = reference_attention(q, k, v, dout, causal)
        idx = local_positions(q.shape[0], rank, world, layout)
        if one_buffer:  # Megatron's fused QKV projection output: [s/N, b, h + 2 h_kv, d]
            qkv = torch.cat([t[idx].float() for t in (q, k, v)], dim=2).requires_grad_(True)
            h, h_kv = q.shape[2], k.shape[2]
            lq, lk, lv = qkv[:, :, :h], qkv[:, :, h : h + h_kv], qkv[:, :, h + h_kv :]
            for t in (lq, lk, lv):
                t.retain_grad()
        else:
            lq, lk, lv = (t[idx].float().clone().requires_grad_(True) for t in (q, k, v))
        with comm.record() as fwd, saved_storages() as saved:
            o = lss_attention(lq, lk, lv, causal=causal, layout=layout, kv_chunks=chunks, **opts)
        with comm.record() as bwd:
            o.backward(dout[idx].float())
        out.append(
            {
                "err": max(
                    (o.detach().double() - ref_out[idx]).abs().max().item(),
                    (lq.grad.double() - ref_dq[idx]).abs().max().item(),
                    (lk.grad.double() - ref_dk[idx]).abs().max().item(),
                    (lv.grad.double() - ref_dv[idx]).abs().max().item(),
                ),
                "fwd": (fwd.count("all_gather", "sp"), fwd.nbytes("sp")),
                "bwd": (bwd.count("reduce_scatter", "sp"), bwd.nbytes("sp")),
                "bwd_gathers": bwd.count("all_gather", "sp"),
                "calls": (fwd.count(), bwd.count()),
                "saved": sum(saved.values()),
            }
        )
    return out


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4: slow tier
def test_chunked_gathers_are_exact_with_the_same_bytes(world):
    case = (True, 8, 4, 8, 32, 2)  # causal, GQA h=8 over h_kv=4, d=8, l=32, b=2
    cases = [
        (case, 1, "contiguous"),
        (case, 2, "contiguous"),
        (case, 4, "contiguous"),
        (case, 2, "zigzag"),
        ((False, 4, 4, 12, 16, 1), 4, "contiguous"),
    ]
    for rank, results in enumerate(run_ranks(_worker, world, cases, timeout=150)):
        one = {c[0]: r for c, r in zip(cases, results, strict=True) if c[1] == 1}
        for (c, chunks, layout), r in zip(cases, results, strict=True):
            tag = f"N={world} rank={rank} C={chunks} {layout} {c}"
            assert r["err"] < TOL, f"{tag}: error {r['err']:.2e}"
            assert r["fwd"][0] == chunks and r["bwd"][0] == chunks, (tag, r)
            if c in one:
                assert r["fwd"][1] == one[c]["fwd"][1] and r["bwd"][1] == one[c]["bwd"][1], tag


@pytest.mark.timeout(240)
@pytest.mark.slow  # ~13 s; the exactness and bytes of chunked gathers stay in the fast tier
def test_chunked_gathers_lower_the_peak_memory():
    from analysis.kv_chunks_memory import measure

    plain, chunked = measure(1, seq=4096), measure(4, seq=4096)
    assert chunked["saved_bytes"] == plain["saved_bytes"]
    assert chunked["sp_comm_bytes"] == plain["sp_comm_bytes"]
    # transient drop: at least a quarter of the gathered [K|V] size (about half is expected:
    # the full-length concatenations of K/V and of their gradients exist one chunk at a time)
    drop = plain["peak_growth_bytes"] - chunked["peak_growth_bytes"]
    assert drop > plain["gathered_kv_bytes"] // 4, (plain, chunked)


# (causal, h, h_kv, d, seq, b): GQA 2:1 and MHA, causal and not
_GQA, _MHA_BIDIR = (True, 8, 4, 8, 32, 2), (False, 4, 4, 12, 16, 1)
_LOCAL, _SEPARATE = (("save_kv", "local"),), (("fused", False),)
_MEGATRON_CP = (("save_kv", "local"), ("fused", False))
_ONE_BUFFER, _ONE_BUFFER_LOCAL = (
    (("qkv_buffer", True),),
    (("save_kv", "local"), ("qkv_buffer", True)),
)
_OVERLAP = (("overlap", True),)
_OVERLAPS = (
    _OVERLAP,
    (*_OVERLAP, *_LOCAL),
    (*_OVERLAP, *_MEGATRON_CP),
    (*_OVERLAP, *_ONE_BUFFER_LOCAL),
)


@pytest.mark.timeout(300)
@pytest.mark.slow  # N = 2 ~25 s, N = 4 ~50 s; LSS local K/V stays in the fast tier via test_model
@pytest.mark.parametrize("world", [2, 4])
def test_local_kv_and_separate_gathers_are_exact_with_their_bytes(world):
    """Every save_kv x fused x overlap x chunks x layout against the float64 reference, and each
    variant's counts, bytes and saved bytes against the paper's form (gathered, fused, not
    overlapped) of the same case."""
    cases = [
        (case, chunks, layout, variant)
        for case in (_GQA, _MHA_BIDIR)
        for chunks in ((1, 2) if case is _GQA else (1,))
        for layout in ("contiguous", "zigzag")
        for variant in ((), _LOCAL, _SEPARATE, _MEGATRON_CP, _ONE_BUFFER, _ONE_BUFFER_LOCAL)
        + _OVERLAPS
    ]
    for rank, results in enumerate(run_ranks(_worker, world, cases, timeout=250)):
        base = {c[:3]: r for c, r in zip(cases, results, strict=True) if c[3] == ()}
        one_base = {c[:3]: r for c, r in zip(cases, results, strict=True) if c[3] == _ONE_BUFFER}
        for (case, chunks, layout, variant), r in zip(cases, results, strict=True):
            tag = f"N={world} rank={rank} C={chunks} {layout} {dict(variant)} {case}"
            assert r["err"] < TOL, f"{tag}: error {r['err']:.2e}"
            opts = dict(variant)
            one_buffer = opts.pop("qkv_buffer", False)
            opts.pop("overlap", None)  # the same bytes, calls and saved bytes as without it
            b = base[(case, chunks, layout)] if not one_buffer else one_base[(case, chunks, layout)]
            local, calls = opts.get("save_kv") == "local", 1 if opts.get("fused", True) else 2
            # forward: the same gathers; backward: the same reduce-scatters, plus under local one
            # re-gather of exactly the forward's bytes
            assert r["fwd"] == (chunks * calls, b["fwd"][1]), tag
            assert r["bwd"][0] == chunks * calls, tag
            assert r["bwd_gathers"] == (chunks * calls if local else 0), tag
            assert r["bwd"][1] == b["bwd"][1] + (b["fwd"][1] if local else 0), tag
            assert r["fwd"][1] + r["bwd"][1] == (1.5 if local else 1) * (
                b["fwd"][1] + b["bwd"][1]
            ), tag
            # saved bytes: local keeps l/N of the gathered K/V, [l, b, 2 h_kv, d] fp32
            _, h, h_kv, d, seq, batch = case
            gathered_kv = seq * batch * 2 * h_kv * d * 4
            # (when k, v share q's buffer, the kernel keeps that buffer for q: local k, v are free)
            drop = (world - 1 if not one_buffer else world) * gathered_kv // world if local else 0
            assert b["saved"] - r["saved"] == drop, (tag, b["saved"], r["saved"])
            # the per-layer formula of docs/modes.md: q and out [l/N, b, h, d] (q: the whole
            # [l/N, b, h + 2 h_kv, d] buffer it is a view of), K/V (gathered [l, ...], or local
            # [l/N, ...] unless they are views of q's buffer), the fp32 log-sum-exp [b, h, l/N]
            sq = seq // world
            kv_len = (0 if one_buffer else sq) if local else seq
            q_heads = h + 2 * h_kv if one_buffer else h
            formula = 4 * ((q_heads + h) * sq * batch * d + 2 * kv_len * batch * h_kv * d)
            formula += 4 * batch * h * sq
            assert r["saved"] == formula, (tag, r["saved"], formula)
