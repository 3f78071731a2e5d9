"""The pieces every mode's cost-model terms are built from (pure Python, torch-free).

Bytes follow `lss_megatron.parallel.comm`'s convention (what one rank sends under ring algorithms
on a group of n ranks): all-gather / reduce-scatter (n-1) x the local shard, all-reduce
``2 (n-1) M // n`` per call, all-to-all ``(n-1) M // n`` of the local tensor, point-to-point the
bytes sent; groups of one rank cost 0. A mode states its traffic as a list of `Collective`s; the
cost model counts their bytes and calls and prices them on a device
(`analysis.costmodel.steptime`). `s` is the model (`analysis.costmodel.counts.Shape`), `lay` the
layout (`counts.Layout`); this module only reads their fields.
"""

from __future__ import annotations

from dataclasses import dataclass

INT64, INT32, BOOL, FP32 = 8, 4, 1, 4


@dataclass(frozen=True)
class Collective:
    """`calls` calls of one collective `op` (all_gather, reduce_scatter, all_reduce, all_to_all,
    p2p), each sending `nbytes` from this rank (comm.py's convention), on a group of `n` ranks
    spaced `stride` apart in Megatron's rank order."""

    op: str
    nbytes: int
    n: int
    calls: int = 1
    stride: int = 1

    @property
    def total_bytes(self) -> int:
        return self.calls * self.nbytes if self.n > 1 else 0

    @property
    def total_calls(self) -> int:
        return self.calls if self.n > 1 else 0


def all_reduce_bytes(nbytes: int, n: int) -> int:
    return 2 * (n - 1) * nbytes // n if n > 1 else 0


def gather_bytes(local_nbytes: int, n: int) -> int:
    """All-gather of a local shard, or reduce-scatter into one: (n-1) x the local shard."""
    return (n - 1) * local_nbytes if n > 1 else 0


def all_to_all_bytes(local_nbytes: int, n: int) -> int:
    return (n - 1) * local_nbytes // n if n > 1 else 0


def forward_repeats(lay, comm_in_core: bool) -> int:
    """How often a layer's forward communication runs per micro-batch: twice under recompute
    (Megatron re-runs the checkpointed part in backward). Collectives inside the core attention
    repeat under selective and full recompute; Megatron's sequence-parallel collectives around
    the linear layers only under full recompute."""
    if lay.recompute == "full" or (lay.recompute == "selective" and comm_in_core):
        return 2
    return 1


def megatron_sp_plan(s, tokens: int, b: int, t: int, es: int, fwd: int = 1) -> list[Collective]:
    """Megatron TP of degree t with sequence_parallel on `tokens` tokens per sequence (nvidia-sp:
    l; LSS x TP: l/N): its gathers, reduce-scatters and all-reduces of one micro-batch; `fwd`:
    how often the layers' forward collectives run (2 under full recompute). The t ranks of a
    tensor-parallel group are consecutive (stride 1)."""
    if t == 1:
        return []
    u = gather_bytes(tokens // t * b * s.hidden * es, t)  # one sequence-parallel AG or RS
    # per layer: forward AG before QKV and FC1, RS after proj and FC2 (4, x fwd); backward the
    # adjoints (4) plus Megatron's re-gather of QKV's and FC1's inputs for weight grads (2);
    # output layer: AG forward, re-gather and RS of the input grad backward
    plan = [
        Collective("all_gather", u, t, s.layers * (2 * fwd + 4) + 2),
        Collective("reduce_scatter", u, t, s.layers * (2 * fwd + 2) + 1),
        # vocab-parallel cross-entropy in fp32 (Megatron casts the logits): max, target, sum-exp
        Collective("all_reduce", all_reduce_bytes(tokens * b * FP32, t), t, 3),
    ]
    if s.learned_positions:  # word embedding all-reduce, then scatter (backward: AG)
        plan += [
            Collective("all_reduce", all_reduce_bytes(b * tokens * s.hidden * es, t), t),
            Collective("all_gather", u, t),
        ]
    else:  # embedding reduce-scatter straight into the sequence shard (backward: AG)
        plan += [Collective("reduce_scatter", u, t), Collective("all_gather", u, t)]
    return plan


# --- bytes saved for backward ------------------------------------------------------------------
def lse_bytes(b: int, heads: int, tokens: int, es: int) -> int:
    """A flash kernel's log-sum-exp [b, heads, tokens]: fp32 (fp64 for fp64 inputs)."""
    return b * heads * tokens * (8 if es == 8 else FP32)


def probs_bytes(b: int, heads: int, rows: int, keys: int, es: int) -> int:
    """Saved probabilities [b, heads, rows, keys]; bf16/fp16 also keep the fp32 softmax output
    (Megatron's ``attention_softmax_in_fp32``)."""
    return b * heads * rows * keys * (es + (FP32 if es < FP32 else 0))


def core_inputs_bytes(s, lay, tokens: int, hp: int, kvp: int) -> int:
    """Storages behind q, k and v as Megatron hands them to the core attention (tokens, hp query
    and kvp key/value heads on this rank): the fused QKV output (v is always a view of it), plus
    q's copy when the head split or RoPE makes one, plus k's RoPE output."""
    b, es, d = lay.micro_batch, lay.act_bytes, s.head_dim
    rope = not s.learned_positions
    total = tokens * b * (hp + 2 * kvp) * d * es
    if rope or (hp > kvp > 1):
        total += tokens * b * hp * d * es
    return total + (tokens * b * kvp * d * es if rope else 0)
