"""ring: ring attention (context parallelism's p2p algorithm) as a mode of the same Megatron GPT model.

The scheme most Megatron users run for long sequences (Megatron-Core's ``cp_comm_type="p2p"``,
ring-flash-attention, PyTorch's ``context_parallel``), on LSS's terms: rank n of a sequence
group of N ranks (Megatron's context-parallel group, TP = 1) holds its segment of every sequence,
contiguous or zigzag (``--lss-layout``, as LSS), with the same sequence-distributed positions
(learned rows / RoPE at global positions), data sharding, loss and double gradient averaging.
Only the core attention differs (`ring_attention.RingCoreAttention`): K/V blocks travel rank to
rank with send/recv, overlapped with the attention of the block in hand, on the blocks of LSS's
kernels, merged through the log-sum-exp; the backward runs the ring in reverse with dK/dV
travelling with their blocks. No head cap: any h, h_kv.

Two calls make a Megatron-Core `GPTModel` a ring model, as for LSS (the trainer uses exactly
them): `get_ring_layer_spec(causal=..., layout=..., kernel=...)` and, once on the built model,
`prepare_ring_model(model, layout=...)`, with LSS's checks.

Packed documents (Megatron-LM's ``--reset-attention-mask``, docs/packed.md): every rank gets the
global document starts ``[b, l]`` with its batch, so it knows which keys of each block in hand
its queries see; the blocks travel as before and the kernel calls cover only the document tiles
(`ring_attention.document_step_tasks`), blocks no local query sees being skipped.

Per layer and micro-batch a rank sends 3 (N-1) local [K | V] blocks of (l/N) b 2 h_kv d elements
in the compute dtype (forward N-1 K/V; backward N-1 K/V and N-1 [dK | dV]), each one isend and
one irecv (category ``sp``); it saves q, one [K | V] block, the output and the lse: nothing of
length l. This module is torch-free at import (config checks and the cost model read it); the
torch part is `ring_attention`, imported when the first layer spec is built.
"""

from __future__ import annotations

from lss_megatron.layout import LAYOUTS
from lss_megatron.modes import lss, serial
from lss_megatron.modes.base import Costs, Mode
from lss_megatron.modes.costs import Collective, forward_repeats, lse_bytes


def get_ring_layer_spec(*, causal: bool = True, layout: str = "contiguous", kernel: str = "flash"):
    """Megatron's local GPT layer spec with `RingCoreAttention` (running `kernel`: flash or dense
    blocks) as its core attention; `layout`: ``contiguous`` or ``zigzag``, as the batches are
    cut."""
    if layout not in LAYOUTS:
        raise ValueError(f"get_ring_layer_spec: layout {layout!r} is not one of {LAYOUTS}")
    from megatron.core.transformer.spec_utils import ModuleSpec

    from .ring_attention import RingCoreAttention

    spec = serial.get_serial_layer_spec(causal)
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=RingCoreAttention, params={"layout": layout, "kernel": kernel}
    )
    return spec


def prepare_ring_model(model, *, layout: str | None = None):
    """Make a built Megatron-Core `GPTModel` (or a wrapper with ``.module``) exact under the ring:
    `prepare_lss_model`'s checks for `RingCoreAttention` built by `get_ring_layer_spec` (same
    layout, one group, context_parallel_size = N, a sequence length the layout cuts, learned /
    RoPE / no positions, not prepared twice), then positions for this rank's segment. `layout`
    defaults to the one the spec built the layers with; given, it must agree. Call once on every
    rank of the context-parallel group; until then a ring layer on N > 1 ranks refuses to
    attend. Returns `model`."""
    from .ring_attention import RingCoreAttention

    return lss.prepare_sequence_model(
        model,
        layout=layout,
        core=RingCoreAttention,
        who="prepare_ring_model",
        spec="get_ring_layer_spec",
    )


def _layer_spec(model, grid, kernel: str = "flash"):
    return get_ring_layer_spec(causal=model.causal, layout=grid.layout, kernel=kernel)


def _post_build(model, grid) -> None:
    prepare_ring_model(model, layout=grid.layout)


# --- cost model --------------------------------------------------------------------------------
def _block(s, lay) -> int:
    """Bytes of one local [K | V] block: (l/N) b 2 h_kv d in the compute dtype."""
    return s.seq // lay.n * lay.micro_batch * 2 * s.kv_heads * s.head_dim * lay.attn_bytes


def sp_plan(s, lay) -> list[Collective]:
    """Per layer and micro-batch, N-1 K/V shifts forward (again under recompute: they sit in the
    core attention), N-1 K/V and N-1 [dK | dV] shifts backward; a shift is one isend of a block
    to the ring neighbour and one irecv (0 bytes: the sender counts them)."""
    n = lay.n
    shifts = s.layers * (forward_repeats(lay, comm_in_core=True) + 2) * (n - 1)
    return [Collective("p2p", _block(s, lay), n, shifts), Collective("p2p", 0, n, shifts)]


def attention_shape(s, lay) -> tuple[int, int, int, int]:
    """Local queries (l/N) against all l keys, block by block."""
    return s.heads, s.kv_heads, s.seq // lay.n, s.seq


def attention_saved(s, lay) -> int:
    """q (a view of the fused QKV output unless RoPE, a GQA head copy or the compute-dtype cast
    made it its own), one [K | V] block (the last one forward held), the output (= the
    projection's input) and the lse; the same for the dense blocks (recomputed in backward)."""
    b, es, d, seg = lay.micro_batch, lay.attn_bytes, s.head_dim, s.seq // lay.n
    h, kvh = s.heads, s.kv_heads
    rope, grouped = not s.learned_positions, h > kvh
    own_q = rope or (grouped and kvh > 1) or lay.attn_cast
    q = seg * b * (h if own_q else h + 2 * kvh) * d * es
    return q + _block(s, lay) + seg * b * h * d * es + lse_bytes(b, h, seg, es)


def kv_transient(s, lay) -> int:
    """What a layer's backward holds beyond the saved bytes, in blocks: the K/V block in hand and
    the one arriving, the [dK | dV] accumulator (fp32) and the one arriving."""
    fp32_block = _block(s, lay) * max(4, lay.attn_bytes) // lay.attn_bytes
    return 3 * _block(s, lay) + fp32_block


# --- memory estimate ---------------------------------------------------------------------------
def estimate_attention(m, n: int, b: int, es: int, kernel: str) -> tuple[int, str]:
    """q, k, v of the segment, one [K | V] block, the output and the log-sum-exp (dense blocks are
    recomputed in backward: nothing quadratic)."""
    seg, d, h, kv = m.seq_length // n, m.head_dim, m.num_heads, m.kv_heads
    saved = seg * b * (h + 2 * kv) * d * es + seg * b * 2 * kv * d * es + seg * b * h * d * es
    name = "ring attention (dense blocks)" if kernel == "dense" else "ring attention"
    return saved + b * h * seg * 4, name


MODE = Mode(
    name="ring",
    label="ring",
    colour="tab:orange",
    degree_group="context",
    layer_spec=_layer_spec,
    post_build=_post_build,
    options=("lss_layout",),
    documents=True,
    costs=Costs(
        sp_plan=sp_plan,
        attention_saved=attention_saved,
        attention_shape=attention_shape,
        local_queries=True,
        comm_in_core=True,
        overlap="overlap_ring",
        kv_transient=kv_transient,
        imbalance=lss.imbalance,  # the same attended pairs per rank as LSS
    ),
    estimate_attention=estimate_attention,
)
