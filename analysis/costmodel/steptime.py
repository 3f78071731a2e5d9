"""Step time of one optimizer step on the slowest rank, one function for every device.

A device (`hw.Device`: a GPU's datasheet and stated efficiencies, or
`calibrated.CalibratedDevice`: a measured CPU) provides the same rates: ``gemm_rate``,
``attention_rate`` by kernel, ``score_time`` (a materialising kernel's score traffic through
memory, where the rate does not include it), ``elementwise_bw``, ``collective_time`` by kind,
group size and stride, ``share`` (how many ranks share a core) and ``overhead`` (fixed seconds
the calibration measured). `step_time` prices the counts (`counts`) and the mode's plans of
collectives (`Mode.costs.sp_plan`, `counts.grad_plan`) on it:

    step = share x [M (GEMMs + attention + elementwise + recompute + per-micro-batch overhead)
                    + per-step overhead + optimizer update]
           + M x exposed activation traffic + gradient synchronisation + small all-reduces

* GEMMs: this rank's forward GEMMs (QKV, proj, FC1, FC2 per layer, the output layer), forward +
  backward = 3 x forward FLOPs, each at the device's rate for its size;
* attention: the executed FLOPs (forward + backward) of the mode's kernel call
  (`Costs.attention_shape`): a flash-style kernel visits the attended (query, key) pairs, a
  materialising kernel (Megatron's DotProductAttention) runs two GEMMs over the FULL square (it
  does not skip masked blocks) and moves the score tensor through memory; LSS and ring
  attention with contiguous causal segments: the last segment's rank attends to the most keys
  and sets the pace;
* communication is not overlapped with compute (the trainer gathers K/V and reduces gradients
  synchronously), except where the mode declares an overlap (`Costs.overlap`) and the
  assumptions turn it on (ring attention; LSS with ``overlap_kv_gather``): its activation
  traffic then hides behind the attention compute; the trainer's ``--lss-overlap`` hides LSS's
  behind the part of the attention that needs no remote K/V (`overlap_share`: the local blocks,
  and all but the first of C head chunks);
* recompute (``train.recompute``) re-runs the checkpointed forward in backward: selective the
  attention core (one third of its forward + backward time; its communication is in the plan),
  full the whole layer (a third of GEMM, attention and elementwise time);
* elementwise work (LayerNorm, GeLU, residual and bias adds, loss): ``elementwise_passes_hidden``
  passes over every [tokens, E] activation and ``elementwise_passes_ffn`` over every [tokens, F]
  one; the optimizer reads and writes its state once per step (`counts.UPDATE_BYTES`).
"""

from __future__ import annotations

from dataclasses import asdict

from .counts import (
    FP32,
    UPDATE_BYTES,
    ZERO_ALIGNMENT,
    Collective,
    Layout,
    Shape,
    all_reduce_bytes,
    attention_pairs,
    buckets,
    gather_bytes,
    grad_plan,
    other_comm,
    param_count,
    sp_plan,
    zero_counts,
    zero_parameters,
)
from .hw import Assumptions

__all__ = ["Assumptions", "step_time"]


def gemm_shapes(s: Shape, lay: Layout) -> list[tuple[int, int, int, int]]:
    """(count per micro-batch, m, k, n) of this rank's forward GEMMs: QKV, proj, FC1, FC2 per
    layer on the tokens of the tensor-parallel region with weights split T ways, the output layer."""
    t, b = lay.tp, lay.micro_batch
    m = b * lay.tp_tokens(s.seq)  # lss x TP: Megatron SP gathers the segment inside the region
    qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
    return [
        (s.layers, m, s.hidden, qkv // t),
        (s.layers, m, s.heads * s.head_dim // t, s.hidden),
        (s.layers, m, s.hidden, s.ffn // t),
        (s.layers, m, s.ffn // t, s.hidden),
        (1, m, s.hidden, s.padded_vocab // t),
    ]


def gemm_flops(s: Shape, lay: Layout) -> float:
    """Executed GEMM FLOPs of one micro-batch, forward + backward, this rank."""
    return sum(count * 3.0 * 2 * m * k * n for count, m, k, n in gemm_shapes(s, lay))


def gemm_time(s: Shape, lay: Layout, dev) -> float:
    """Seconds of linear layers, forward + backward (3 GEMMs of 2mkn FLOPs each), one micro-batch."""
    total = 0.0
    for count, m, k, n in gemm_shapes(s, lay):
        flops = 3.0 * 2 * m * k * n
        total += count * flops / dev.gemm_rate(flops, lay.act_bytes)
    return total


def attention_work(s: Shape, lay: Layout) -> tuple[float, float]:
    """(executed attention FLOPs forward + backward, score bytes through memory) of one
    micro-batch on the slowest rank."""
    b, d, ll, n = lay.micro_batch, s.head_dim, s.seq, lay.n
    kernel = lay.attention_kernel
    heads, _, sq, _ = lay.spec.costs.attention_shape(s, lay)
    if not lay.spec.costs.local_queries:  # all l queries (serial, nvidia-sp, ulysses)
        pairs = sq * ll if kernel == "materialized" else attention_pairs(ll, s.causal)
    else:  # local queries against all keys (lss, ring): the last segment sees the most
        seg = sq
        if kernel == "materialized" or not s.causal:
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


def attention_time(s: Shape, lay: Layout, dev) -> float:
    """Seconds of the attention kernel calls of one micro-batch, forward + backward."""
    flops, scores = attention_work(s, lay)
    if not flops:
        return 0.0
    per_call = flops / s.layers / lay.micro_batch
    queries = lay.spec.costs.attention_shape(s, lay)[2]
    rate = dev.attention_rate(lay.attention_kernel, per_call, s.head_dim, queries, lay.act_bytes)
    return flops / rate + dev.score_time(scores)


def elementwise_bytes(s: Shape, lay: Layout, a: Assumptions) -> float:
    ll, b, es, t = s.seq, lay.micro_batch, lay.act_bytes, lay.tp
    tp_tokens = lay.tp_tokens(ll)
    norm_tokens = tp_tokens // t
    per_layer = a.elementwise_passes_hidden * norm_tokens * s.hidden
    per_layer += a.elementwise_passes_ffn * tp_tokens * (s.ffn // t)
    loss = 6 * tp_tokens * (s.padded_vocab // t)
    return float(b * es * (s.layers * per_layer + loss))


def plan_time(plan: list[Collective], dev) -> float:
    """Seconds of a list of collectives on `dev` (`collective_time`, by kind, group and stride)."""
    return sum(
        c.calls * dev.collective_time(c.op, c.nbytes, c.n, c.stride) for c in plan if c.n > 1
    )


def sp_comm_time(s: Shape, lay: Layout, dev) -> float:
    """Seconds of activation traffic for one micro-batch (forward + backward), this rank."""
    return plan_time(sp_plan(s, lay), dev)


def grad_comm_time(s: Shape, lay: Layout, dev) -> float:
    """Seconds of gradient synchronisation per step (`counts.grad_plan`, no overlap)."""
    return plan_time(grad_plan(s, lay), dev)


def other_comm_time(s: Shape, lay: Layout, dev) -> float:
    """Seconds of the step's small all-reduces (`counts.other_comm`: the loss, the global norm's
    partial sums), each priced as 16 bytes over all ranks."""
    return other_comm(s, lay)[1] * dev.collective_time("all_reduce", 16, lay.world)


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


def zero_partition(s: Shape, lay: Layout) -> int:
    """Elements of one rank's ZeRO partition: the flat buffer padded to a multiple of
    ``ZERO_ALIGNMENT`` x group, cut into equal parts (`counts.zero_counts`)."""
    numel = sum(p.numel for p in zero_parameters(s, lay))
    align = ZERO_ALIGNMENT * lay.grad_group
    return -(-numel // align) * align // lay.grad_group


def zero_grad_time(s: Shape, lay: Layout, dev) -> float:
    """Seconds of DeepSpeed ZeRO's gradient traffic per step, the collectives `counts.zero_counts`
    counts: the gradients all-reduced in buckets (stage 1 once per step, stage 2 after every
    micro-batch), the updated partitions all-gathered, the fp32 norm all-reduced."""
    group, pb = lay.grad_group, lay.param_bytes
    if group <= 1:
        return 0.0
    reductions = 1 if lay.zero_stage == 1 else lay.micro_batches
    bs = buckets([p.numel * pb for p in zero_parameters(s, lay)])
    return (
        reductions
        * sum(dev.collective_time("all_reduce", all_reduce_bytes(x, group), group) for x in bs)
        + dev.collective_time("all_gather", gather_bytes(zero_partition(s, lay) * pb, group), group)
        + dev.collective_time("all_reduce", all_reduce_bytes(FP32, group), group)
    )


def step_time(s: Shape, lay: Layout, dev, optimizer: str) -> dict:
    """Seconds per optimizer step on the slowest rank of `dev` (a `hw.Device` or a
    `calibrated.CalibratedDevice`; its `assumptions` hold the stated efficiencies and overlaps),
    with its breakdown."""
    a, mode, m = dev.assumptions, lay.mode, lay.micro_batches
    share = dev.share(lay.world)
    gemm = gemm_time(s, lay, dev)
    attention = attention_time(s, lay, dev)
    tensor = lay.micro_batch * lay.tp_tokens(s.seq) * s.hidden * lay.act_bytes
    elementwise = elementwise_bytes(s, lay, a) / dev.elementwise_bw(tensor)
    redo = attention / 3  # recompute: the forward share (1 of 3) of what is re-run
    redo += (gemm + elementwise) / 3 if lay.recompute == "full" else 0.0
    recompute = redo if lay.recompute in ("selective", "full") else 0.0
    sp = sp_comm_time(s, lay, dev)
    overlap = lay.spec.costs.overlap
    if overlap is not None and getattr(a, overlap):
        sp = max(0.0, sp - attention)
    elif mode == "lss" and lay.overlap:  # --lss-overlap: what needs no remote K/V hides it
        sp = max(0.0, sp - attention * overlap_share(s, lay))
    fixed_micro = dev.overhead("per_micro", mode) + s.layers * dev.overhead("per_micro_layer", mode)
    fixed_step = dev.overhead("per_step", mode) + s.layers * dev.overhead("per_step_layer", mode)
    update = UPDATE_BYTES.get(optimizer, UPDATE_BYTES["sgd"])
    # ZeRO where the counts model its traffic (not nvidia-sp's tensor-parallel sums): its own
    # gradient collectives, and the optimizer updates only this rank's partition
    zero = bool(lay.zero_stage) and zero_counts(s, lay, optimizer)["grad_comm_bytes"] is not None
    updated = zero_partition(s, lay) if zero else param_count(s, lay)
    opt = updated * update / dev.elementwise_bw(1 << 22)
    parts = {
        "gemm": share * m * gemm,
        "attention": share * m * attention,
        "elementwise": share * m * elementwise,
        "recompute": share * m * recompute,
        "fixed_overhead": share * (m * fixed_micro + fixed_step),
        "optimizer": share * opt,
        "sp_comm_exposed": m * sp,
        "grad_comm": zero_grad_time(s, lay, dev) if zero else grad_comm_time(s, lay, dev),
        "other_comm": other_comm_time(s, lay, dev),
    }
    queries = lay.spec.costs.attention_shape(s, lay)[2]
    return {
        "step_time_s": sum(parts.values()),
        "time_breakdown_s": parts,
        "compute_share": share,
        "precision": dev.precision(lay.act_bytes),
        "assumptions": asdict(a),
        "attention_efficiency": dev.attention_fraction(queries, lay.act_bytes),
        **dev.report([3.0 * 2 * x * y * z for _, x, y, z in gemm_shapes(s, lay)], lay.act_bytes),
    }
