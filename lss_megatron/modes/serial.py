"""serial: N = 1, Megatron-Core's stock local GPT layer spec (its `DotProductAttention`): the
one-process reference every parallel mode is tested against. Its spec is also the base the other
modes change (one field for LSS and Ulysses, the norms for nvidia-sp), and its attention terms
(Megatron's attention on all l tokens of this rank's heads) are nvidia-sp's too."""

from __future__ import annotations

import copy

from .base import Costs, Mode
from .costs import BOOL, core_inputs_bytes, lse_bytes, probs_bytes


def get_serial_layer_spec(causal: bool = True, kernel: str = "flash"):
    """Megatron's stock local GPT layer spec, the one-process reference; its core attention is
    Megatron's own `DotProductAttention` for the dense kernel, `FlashCoreAttention` for flash
    (``--attention-kernel``)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnMaskType

    from ..lss.core_attention import KERNELS, FlashCoreAttention

    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; expected one of {KERNELS}")
    spec = copy.deepcopy(get_gpt_layer_local_spec())
    mask = AttnMaskType.causal if causal else AttnMaskType.no_mask
    spec.submodules.self_attention.params["attn_mask_type"] = mask
    if kernel == "flash":
        spec.submodules.self_attention.submodules.core_attention = FlashCoreAttention
    return spec


def layer_spec(model, grid, kernel: str = "flash"):
    return get_serial_layer_spec(model.causal, kernel)


# --- cost model: Megatron's attention on all l tokens of this rank's h/t heads -----------------
def attention_shape(s, lay) -> tuple[int, int, int, int]:
    return s.heads // lay.tp, s.kv_heads // lay.tp, s.seq, s.seq


def _dpa_saved(s, lay, sq: int) -> int:
    """Megatron's DotProductAttention on hp = h/t heads over sq tokens."""
    t, b, es, d = lay.tp, lay.micro_batch, lay.act_bytes, s.head_dim
    hp, kvp = s.heads // t, s.kv_heads // t
    grouped, rope = s.heads > s.kv_heads, not s.learned_positions
    full = sq * b * hp * d * es
    # q stays a view of the fused QKV output unless RoPE rewrites it or the head split needs a
    # copy: [sq, b, ng, g*d] -> [sq*b*hp, d] is a view only if g == 1, or ng == 1 and b == 1
    q_view = not rope and (not grouped or (kvp == 1 and b == 1))
    k_view, v_view = not (rope or grouped), not grouped
    total = 0 if q_view else full  # rope output, or a copy when heads are grouped
    if grouped:
        total += 2 * full  # k and v repeated to hp heads
    elif rope:
        total += sq * b * kvp * d * es  # rope output of k
    if q_view or k_view or v_view:
        total += sq * b * (hp + 2 * kvp) * d * es  # the fused QKV output they are views of
    total += sq * sq * BOOL if s.causal else 0  # the causal mask, rebuilt per layer
    return total + probs_bytes(b, hp, sq, sq, es) + full  # probabilities, context (proj input)


def _flash_saved(s, lay, sq: int) -> int:
    """`FlashCoreAttention` on hp = h/t heads over sq tokens: its inputs q, k, v, the output
    (= the projection's input) and the log-sum-exp."""
    hp, kvp, b = s.heads // lay.tp, s.kv_heads // lay.tp, lay.micro_batch
    out = sq * b * hp * s.head_dim * lay.act_bytes
    return core_inputs_bytes(s, lay, sq, hp, kvp) + out + lse_bytes(b, hp, sq, lay.act_bytes)


def attention_saved(s, lay) -> int:
    if lay.attention_kernel == "materialized":
        return _dpa_saved(s, lay, s.seq)
    return _flash_saved(s, lay, s.seq)


def no_traffic(s, lay) -> list:
    return []


# --- memory estimate ---------------------------------------------------------------------------
def estimate_whole_sequence(m, t: int, b: int, es: int, kernel: str) -> tuple[int, str]:
    """Megatron's attention over all l tokens of h/t heads: q, k, v and the context (dense:
    probabilities and mask; flash: the log-sum-exp)."""
    ll, d, h, kv = m.seq_length, m.head_dim, m.num_heads, m.kv_heads
    saved = ll * b * (h + 2 * kv) // t * d * es + ll * b * h // t * d * es  # qkv, context
    if kernel == "dense":
        saved += b * (h // t) * ll * ll * es + (ll * ll if m.causal else 0)  # probs, mask
        return saved, "DotProductAttention (scores materialised)"
    return saved + b * (h // t) * ll * 4, "flash attention"  # lse


def estimate_attention(m, n: int, b: int, es: int, kernel: str) -> tuple[int, str]:
    return estimate_whole_sequence(m, 1, b, es, kernel)


def _degree_problems(n: int) -> list[str]:
    if n == 1:
        return []
    return [
        f"--mode serial means no sequence parallelism (N = 1), got --seq-parallel {n}; use "
        "--mode lss for N > 1"
    ]


MODE = Mode(
    name="serial",
    label="serial",
    colour="tab:gray",
    degree_group=None,
    layer_spec=layer_spec,
    costs=Costs(
        sp_plan=no_traffic,
        attention_saved=attention_saved,
        attention_shape=attention_shape,
        default_kernel="materialized",
    ),
    estimate_attention=estimate_attention,
    degree_problems=_degree_problems,
    megatron_attention=True,
    documents=True,
)
