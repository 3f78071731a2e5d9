"""Step time of one optimizer step on the slowest rank: a roofline for compute plus alpha-beta
communication (`hw`), with every efficiency an explicit, stated assumption.

    step = M x (GEMMs + attention + memory-bound elementwise + exposed activation traffic)
           + gradient synchronisation + optimizer update

* GEMMs: executed FLOPs (forward + backward = 3 x forward) / (peak x ``gemm_efficiency``);
* attention: a flash-style kernel visits the attended (query, key) pairs at
  ``attention_efficiency`` of peak; a materialising kernel (Megatron's DotProductAttention) runs
  two GEMMs over the FULL l x l square (it does not skip masked blocks) and moves the score tensor
  through HBM ``score_passes`` times (scores, mask, softmax, dropout-free probabilities, their
  gradients);
* LSS and ring attention with contiguous causal segments: the last segment's rank attends to
  the most keys and sets the pace;
* communication is not overlapped with compute (the trainer gathers K/V and reduces gradients
  synchronously), except ring attention, whose K/V passing hides behind the attention compute,
  and, with ``overlap_kv_gather``, LSS's K/V gather and reduce-scatter, which then hide behind
  the attention compute in the same way (a fully pipelined gather); the trainer's
  ``--lss-overlap`` hides them behind the part of the attention that needs no remote K/V
  (`overlap_share`: the local blocks, and all but the first of C head chunks);
* recompute (``train.recompute``) re-runs the checkpointed forward in backward: selective the
  attention core (one third of its forward + backward time, and LSS's / Ulysses' forward
  communication once more), full the whole layer (a third of GEMM, attention and elementwise
  time, and every forward collective once more), as `counts` counts the repeated traffic;
* elementwise work (LayerNorm, GeLU, residual and bias adds, loss): ``elementwise_passes_hidden``
  passes over every [tokens, E] activation and ``elementwise_passes_ffn`` over every [tokens, F]
  one, at HBM bandwidth; the optimizer reads and writes its state once per step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .counts import (
    Layout,
    Shape,
    _forward_repeats,
    all_reduce_bytes,
    attention_pairs,
    buckets,
    gather_bytes,
    param_count,
    parameters,
)
from .hw import Device


@dataclass(frozen=True)
class Assumptions:
    """Efficiencies of the time model (fractions of datasheet peaks)."""

    gemm_efficiency: float = 0.7
    attention_efficiency: float = 0.5
    score_passes: int = 15
    elementwise_passes_hidden: int = 30
    elementwise_passes_ffn: int = 10
    overlap_ring: bool = True
    overlap_kv_gather: bool = False


def precision_of(lay: Layout) -> str:
    return "fp32" if lay.act_bytes == 4 else "fp16"


def _peak(dev: Device, lay: Layout) -> float:
    prec = precision_of(lay)
    if prec == "fp16" and "fp16" not in dev.peak_flops:
        prec = "bf16"
    return dev.peak(prec)


def gemm_flops(s: Shape, lay: Layout) -> float:
    """Executed GEMM FLOPs of one micro-batch, forward + backward, this rank."""
    per_token = (
        s.layers
        * (
            2 * s.hidden * (s.heads + 2 * s.kv_heads) * s.head_dim
            + 2 * s.heads * s.head_dim * s.hidden
            + 4 * s.hidden * s.ffn
        )
        + 2 * s.hidden * s.padded_vocab
    )
    return 3.0 * lay.micro_batch * (s.seq / (lay.n * lay.t)) * per_token


def attention_work(s: Shape, lay: Layout) -> tuple[float, float]:
    """(executed attention FLOPs forward + backward, score bytes through HBM) of one micro-batch on
    the slowest rank."""
    b, d, ll, n = lay.micro_batch, s.head_dim, s.seq, lay.n
    seg = ll // n
    kernel = lay.attention_kernel
    if lay.mode in ("serial", "nvidia-sp", "ulysses"):
        heads, sq = s.heads // (lay.tp if lay.mode != "ulysses" else n), ll
        pairs = sq * ll if kernel == "materialized" else attention_pairs(ll, s.causal)
    else:  # lss, ring: local queries against all keys; the last segment sees the most
        heads, sq = s.heads // lay.t, seg
        if kernel == "materialized":
            pairs = seg * ll
        elif not s.causal:
            pairs = seg * ll
        elif lay.zigzag:  # balanced: every rank does 1/N of the causal pairs (+ rounding)
            pairs = -(-attention_pairs(ll, True) // n)
        else:
            pairs = seg * (ll - seg) + attention_pairs(seg, True)
    flops = 3.0 * 4 * b * heads * d * pairs * s.layers
    scores = (
        float(b * heads * sq * ll * lay.act_bytes * s.layers) if kernel == "materialized" else 0.0
    )
    return flops, scores


def elementwise_bytes(s: Shape, lay: Layout, a: Assumptions) -> float:
    ll, b, es, t = s.seq, lay.micro_batch, lay.act_bytes, lay.tp
    tp_tokens = lay.tp_tokens(ll)
    norm_tokens = tp_tokens // t
    per_layer = a.elementwise_passes_hidden * norm_tokens * s.hidden
    per_layer += a.elementwise_passes_ffn * tp_tokens * (s.ffn // t)
    loss = 6 * tp_tokens * (s.padded_vocab // t)
    return float(b * es * (s.layers * per_layer + loss))


def sp_comm_time(s: Shape, lay: Layout, dev: Device) -> float:
    """Seconds of activation traffic for one micro-batch (forward + backward), this rank."""
    net, n, b, es, ll = dev.network, lay.n, lay.micro_batch, lay.act_bytes, s.seq
    if n == 1 and lay.tp == 1:
        return 0.0
    seg = ll // n
    kes = lay.attn_bytes if lay.mode in ("lss", "ulysses") else es  # cast before they travel
    kv = seg * b * 2 * (s.kv_heads // lay.t) * s.head_dim * kes
    if lay.mode == "lss":
        # the N ranks of a sequence group are T apart (Megatron's order tp-cp-dp)
        gathers = (
            s.layers
            * (_forward_repeats(lay) + 1)
            * net.time("all_gather", gather_bytes(kv, n), n, lay.t)
        )
        return gathers + _megatron_sp_time(s, seg, lay, dev)
    if lay.mode == "ring":
        alpha, bw = net.link(n)  # every step, every rank sends a block to its ring neighbour
        return s.layers * 3 * (n - 1) * (alpha + kv / bw)
    if lay.mode == "ulysses":
        q = seg * b * s.heads * s.head_dim * kes
        k = seg * b * s.kv_heads * s.head_dim * kes
        one = [q, k, k, q]  # q, k, v in; output back
        repeats = _forward_repeats(lay) + 1
        return s.layers * repeats * sum(net.time("all_to_all", (n - 1) * x / n, n) for x in one)
    if lay.mode == "nvidia-sp":
        return _megatron_sp_time(s, ll, lay, dev)
    return 0.0


def _megatron_sp_time(s: Shape, tokens: int, lay: Layout, dev: Device) -> float:
    """Megatron TP + sequence_parallel over `tokens` tokens per sequence on lay.tp ranks."""
    net, t, b, es = dev.network, lay.tp, lay.micro_batch, lay.act_bytes
    if t == 1:
        return 0.0
    u = net.time("all_gather", gather_bytes(tokens // t * b * s.hidden * es, t), t)
    fwd = 2 if lay.recompute == "full" else 1  # forward collectives repeat under full recompute
    total = ((4 * fwd + 6) * s.layers + 3) * u
    total += 3 * net.time("all_reduce", all_reduce_bytes(tokens * b * es, t), t)
    if s.learned_positions:
        total += net.time("all_reduce", all_reduce_bytes(b * tokens * s.hidden * es, t), t) + u
    else:
        total += 2 * u
    return total


def grad_comm_time(s: Shape, lay: Layout, dev: Device) -> float:
    """Seconds of gradient synchronisation per step (bucketed all-reduces, no overlap)."""
    net, pb = dev.network, lay.param_bytes
    ps = parameters(s, lay)

    def reduce(sel, n: int, stride: int) -> float:
        if n <= 1 or not sel:
            return 0.0
        return sum(
            net.time("all_reduce", all_reduce_bytes(x, n), n, stride)
            for x in buckets([p.numel * pb for p in sel])
        )

    tp_sums = reduce([p for p in ps if p.tp_partial], lay.tp, 1)
    if lay.mode == "nvidia-sp":
        return tp_sums + reduce(ps, lay.d, lay.n)
    return (
        tp_sums
        + reduce([p for p in ps if not p.seq_local], lay.grad_group, lay.t)
        + reduce([p for p in ps if p.seq_local], lay.d, lay.n * lay.t)
    )


def overlap_share(s: Shape, lay: Layout) -> float:
    """Under --lss-overlap, the share of the slowest rank's attention (forward and backward)
    that can run while its K/V collectives travel: the local blocks (the causal diagonal, the
    earlier local chunk under zigzag; all local keys without a mask) need no remote K/V, and with
    C head chunks every chunk but the first also runs while the next chunk travels."""
    n, seg = lay.n, s.seq // lay.n
    if n == 1:
        return 1.0
    if not s.causal:
        local = 1.0 / n
    elif lay.zigzag:  # chunks r, 2N-1-r: diagonals of both and the full earlier-chunk block
        c = seg // 2
        local = (2 * c * (c + 1) / 2 + c * c) / (attention_pairs(s.seq, True) / n)
    else:  # the last segment's rank: its diagonal against (N-1) l/N prefix keys
        diag = seg * (seg + 1) / 2
        local = diag / (diag + (n - 1) * seg * seg)
    c = lay.kv_chunks
    return local + (1.0 - local) * (c - 1) / c


def attention_efficiency(s: Shape, lay: Layout, dev: Device, a: Assumptions) -> float:
    """The fused attention kernel's fraction of peak: measured on this device at this rank's
    l/N (launch/gpu_check.sh, bf16, `Device.attention_efficiency`) for 16-bit runs where there is
    a measurement, else the assumed ``a.attention_efficiency``."""
    queries = s.seq if lay.mode == "ulysses" else s.seq // lay.n  # per kernel call
    measured = dev.attention_efficiency_at(queries) if lay.attn_bytes == 2 else None
    return measured if measured is not None else a.attention_efficiency


def step_time(s: Shape, lay: Layout, dev: Device, a: Assumptions, optimizer: str) -> dict:
    """Seconds per optimizer step on the slowest rank, with its breakdown."""
    peak, hbm = _peak(dev, lay), dev.hbm_bw
    gemm = gemm_flops(s, lay) / (peak * a.gemm_efficiency)
    att_flops, score_bytes = attention_work(s, lay)
    if lay.attention_kernel == "materialized":
        attention = att_flops / (peak * a.gemm_efficiency) + a.score_passes * score_bytes / hbm
    else:
        attention = att_flops / (peak * attention_efficiency(s, lay, dev, a))
    elementwise = elementwise_bytes(s, lay, a) / hbm
    sp = sp_comm_time(s, lay, dev)
    if (lay.mode == "ring" and a.overlap_ring) or (lay.mode == "lss" and a.overlap_kv_gather):
        sp = max(0.0, sp - attention)
    elif lay.mode == "lss" and lay.overlap:  # --lss-overlap: what needs no remote K/V hides it
        sp = max(0.0, sp - attention * overlap_share(s, lay))
    redo = attention / 3  # recompute: the forward share (1 of 3) of what is re-run
    redo += (gemm + elementwise) / 3 if lay.recompute == "full" else 0.0
    recompute = redo if lay.recompute in ("selective", "full") else 0.0
    per_micro = gemm + attention + elementwise + sp + recompute
    grad = grad_comm_time(s, lay, dev)
    update_bytes = 28 if optimizer == "adamw" else 12  # fp32 param, grad, state: read + write
    opt = param_count(s, lay) * update_bytes / hbm
    m = lay.micro_batches
    total = m * per_micro + grad + opt
    return {
        "step_time_s": total,
        "time_breakdown_s": {
            "gemm": m * gemm,
            "attention": m * attention,
            "elementwise": m * elementwise,
            "sp_comm_exposed": m * sp,
            "recompute": m * recompute,
            "grad_comm": grad,
            "optimizer": opt,
        },
        "assumptions": asdict(a),
        "attention_efficiency": attention_efficiency(s, lay, dev, a),
        "precision": precision_of(lay),
        "peak_flops": peak,
    }
