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
  the attention compute in the same way (a pipelined, chunked gather; the trainer does not);
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
    UPDATE_BYTES,
    Collective,
    Layout,
    Shape,
    attention_pairs,
    grad_plan,
    param_count,
    sp_plan,
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
    kernel = lay.attention_kernel
    heads, _, sq, keys = lay.spec.costs.attention_shape(s, lay)
    if not lay.spec.costs.local_queries:  # all l queries (serial, nvidia-sp, ulysses)
        pairs = sq * ll if kernel == "materialized" else attention_pairs(ll, s.causal)
    else:  # local queries against all keys (lss, ring): the last segment sees the most
        seg = sq
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


def plan_time(plan: list[Collective], network) -> float:
    """Seconds of a list of collectives on `network` (`hw.Network` or the calibrated CPU's)."""
    return sum(c.calls * network.time(c.op, c.nbytes, c.n, c.stride) for c in plan if c.n > 1)


def sp_comm_time(s: Shape, lay: Layout, dev: Device) -> float:
    """Seconds of activation traffic for one micro-batch (forward + backward), this rank."""
    return plan_time(sp_plan(s, lay), dev.network)


def grad_comm_time(s: Shape, lay: Layout, dev: Device) -> float:
    """Seconds of gradient synchronisation per step (`counts.grad_plan`, no overlap)."""
    return plan_time(grad_plan(s, lay), dev.network)


def attention_efficiency(s: Shape, lay: Layout, dev: Device, a: Assumptions) -> float:
    """The fused attention kernel's fraction of peak: measured on this device at this rank's
    l/N (launch/gpu_check.sh, bf16, `Device.attention_efficiency`) for 16-bit runs where there is
    a measurement, else the assumed ``a.attention_efficiency``."""
    queries = lay.spec.costs.attention_shape(s, lay)[2]  # per kernel call
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
    overlap = lay.spec.costs.overlap
    if overlap is not None and getattr(a, overlap):
        sp = max(0.0, sp - attention)
    redo = attention / 3  # recompute: the forward share (1 of 3) of what is re-run
    redo += (gemm + elementwise) / 3 if lay.recompute == "full" else 0.0
    recompute = redo if lay.recompute in ("selective", "full") else 0.0
    per_micro = gemm + attention + elementwise + sp + recompute
    grad = grad_comm_time(s, lay, dev)
    opt = param_count(s, lay) * UPDATE_BYTES.get(optimizer, UPDATE_BYTES["sgd"]) / hbm
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
