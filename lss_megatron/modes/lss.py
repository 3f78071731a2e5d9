"""lss: the LSS Transformer on Megatron's context-parallel group of N ranks, and its public API.

Two calls make a Megatron-Core `GPTModel` an LSS model (the trainer's lss mode uses exactly them):

* `get_lss_layer_spec(causal=..., layout=..., kv_chunks=...)`: Megatron's local GPT layer spec
  with `LSSCoreAttention` as its one changed field; the segment layout and the K/V gather
  chunking are parameters of that spec (`ModuleSpec.params`), so every layer is built with them;
* `prepare_lss_model(model)`: once, on the built model, on every rank of the
  context-parallel group (the layout is the spec's; an unprepared model refuses to run): checks that the model is one LSS can make exact, then makes positions
  sequence-distributed (learned rows, RoPE angles) for the layout.

Batches must then be cut by the same layout (contiguous segment n, or zigzag chunks n and 2N-1-n,
which is Megatron-LM's `get_batch_on_this_cp_rank`) and carry GLOBAL position ids.
"""

from __future__ import annotations

from ..config import SAVE_KV
from ..layout import LAYOUTS, segment_chunks
from .base import Costs, Mode
from .costs import (
    BOOL,
    Collective,
    forward_repeats,
    gather_bytes,
    lse_bytes,
    megatron_sp_plan,
    probs_bytes,
)
from .serial import get_serial_layer_spec

POSITION_TYPES = ("learned_absolute", "rope", "none")
"""`GPTModel.position_embedding_type`s LSS makes exact (yarn and mrope are refused)."""


def get_lss_layer_spec(
    *,
    causal: bool = True,
    layout: str = "contiguous",
    kv_chunks: int = 1,
    kernel: str = "flash",
    save_kv: str = "gathered",
    fused_kv: bool = True,
    overlap: bool = False,
):
    """Megatron's local GPT layer spec with `LSSCoreAttention` (running `kernel`: flash or dense)
    as its core attention.

    `layout`: ``contiguous`` (rank n holds [n l/N, (n+1) l/N)) or ``zigzag`` (chunks n and
    2N-1-n of 2N); `kv_chunks`: gather K/V in this many double-buffered head chunks (it must
    divide each rank's key/value heads, h_kv / tensor-parallel size); `save_kv`: what autograd
    keeps of K/V, ``gathered`` (the paper) or ``local`` (this rank's segment, re-gathered in
    backward: one more gather per layer; flash kernel only); `fused_kv`: K and V in one collective
    each way (the paper) or False, two (Megatron-Core's all_gather CP); `overlap`: the gather
    behind the local blocks, the reduce-scatter behind the rest of backward (flash kernel only;
    the same result and bytes)."""
    if layout not in LAYOUTS:
        raise ValueError(f"get_lss_layer_spec: layout {layout!r} is not one of {LAYOUTS}")
    if not isinstance(kv_chunks, int) or kv_chunks < 1:
        raise ValueError(f"get_lss_layer_spec: kv_chunks must be an int >= 1, got {kv_chunks!r}")
    if save_kv not in SAVE_KV:
        raise ValueError(f"get_lss_layer_spec: save_kv {save_kv!r} is not one of {SAVE_KV}")
    if save_kv == "local" and kernel != "flash":
        raise ValueError(
            f"get_lss_layer_spec: save_kv='local' needs kernel='flash', got {kernel!r} (the dense "
            "kernel saves its own copies of the gathered K/V)"
        )
    if not isinstance(fused_kv, bool):
        raise ValueError(f"get_lss_layer_spec: fused_kv must be a bool, got {fused_kv!r}")
    if not isinstance(overlap, bool):
        raise ValueError(f"get_lss_layer_spec: overlap must be a bool, got {overlap!r}")
    if overlap and kernel != "flash":
        raise ValueError(f"get_lss_layer_spec: overlap needs kernel='flash', got {kernel!r}")
    from megatron.core.transformer.spec_utils import ModuleSpec

    from ..lss.core_attention import LSSCoreAttention

    spec = get_serial_layer_spec(causal)
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=LSSCoreAttention,
        params={
            "layout": layout,
            "kv_chunks": kv_chunks,
            "kernel": kernel,
            "save_kv": save_kv,
            "fused_kv": fused_kv,
            "overlap": overlap,
        },
    )
    return spec


def _unwrap(model, who: str = "prepare_lss_model"):
    """The GPTModel inside Megatron's wrappers (DDP, Float16Module: ``.module``)."""
    from megatron.core.models.gpt import GPTModel

    inner = model
    while not isinstance(inner, GPTModel) and hasattr(inner, "module"):
        inner = inner.module
    if not isinstance(inner, GPTModel):
        raise TypeError(f"{who}: expected a Megatron-Core GPTModel, got {type(model).__name__}")
    return inner


def _check_attention(
    gpt,
    layout: str | None,
    core=None,
    who="prepare_lss_model",
    spec="get_lss_layer_spec",
    **options,
) -> list:
    """Every core attention is an LSSCoreAttention (built for `layout` and the `options`, e.g.
    ``save_kv``, ``overlap``, when they are not None) on one group, all built alike."""
    from ..lss.core_attention import LSSCoreAttention

    core = core or LSSCoreAttention  # the ring's prepare passes its own (prepare_sequence_model)

    attentions = [m for m in gpt.modules() if hasattr(m, "core_attention")]
    cores = [a.core_attention for a in attentions]
    other = sorted({type(c).__name__ for c in cores if not isinstance(c, core)})
    if not cores or other:
        raise ValueError(
            f"{who}: the model's core attention is "
            f"{other or 'missing'}, not {core.__name__}: build the GPTModel with "
            f"transformer_layer_spec={spec}(...)"
        )
    wrong = sorted({c.layout for c in cores if c.layout != layout})
    if layout is not None and wrong:
        raise ValueError(
            f"{who}: layout {layout!r}, but the model was built with "
            f"{spec}(layout={wrong[0]!r}); use the same layout in both"
        )
    if len({c.layout for c in cores}) != 1:
        raise ValueError(f"{who}: the layers were built with different layouts")
    for name, want in options.items():
        built = sorted({repr(getattr(c, name)) for c in cores})
        if len(built) != 1:
            raise ValueError(f"prepare_lss_model: the layers were built with different {name}")
        if want is not None and built[0] != repr(want):
            raise ValueError(
                f"prepare_lss_model: {name} {want!r}, but the model was built with "
                f"get_lss_layer_spec({name}={built[0]}); use the same {name} in both"
            )
    if len({id(c.seq_group) for c in cores}) != 1:
        raise ValueError(f"{who}: the layers attend over different process groups")
    return cores


def _check_model(gpt, n: int, layout: str, who: str = "prepare_lss_model") -> None:
    """Megatron's config, the sequence length and the positional encoding fit N and `layout`."""
    from ..lss.positions import SegmentPositionEmbedding, SegmentRotaryEmbedding

    cfg = gpt.config
    if cfg.context_parallel_size != n:
        raise ValueError(
            f"{who}: the model was built with context_parallel_size="
            f"{cfg.context_parallel_size} but its attention runs on a context-parallel group of "
            f"{n} ranks; build it after initialize_model_parallel(context_parallel_size={n})"
        )
    try:
        segment_chunks(gpt.max_sequence_length, 0, n, layout)
    except ValueError as e:
        raise ValueError(f"{who}: max_sequence_length: {e}") from None
    kind = gpt.position_embedding_type
    if kind not in POSITION_TYPES:
        raise ValueError(
            f"{who}: position_embedding_type {kind!r} is not supported (one of {POSITION_TYPES})"
        )
    emb = getattr(gpt, "embedding", None)
    if isinstance(
        getattr(emb, "position_embeddings", None), SegmentPositionEmbedding
    ) or isinstance(getattr(gpt, "rotary_pos_emb", None), SegmentRotaryEmbedding):
        raise RuntimeError(f"{who}: this model is already prepared (call it once)")
    if kind == "rope" and not hasattr(gpt.rotary_pos_emb, "get_emb"):
        raise ValueError(
            f"{who}: rotary embedding {type(gpt.rotary_pos_emb).__name__} has no "
            "get_emb(); only Megatron's RotaryEmbedding is supported"
        )


def prepare_lss_model(
    model, *, layout: str | None = None, save_kv: str | None = None, overlap: bool | None = None
):
    """Make a built Megatron-Core `GPTModel` (or a wrapper with ``.module``) exact under LSS.

    Call once on every rank of the context-parallel group, after `GPTModel(...,
    transformer_layer_spec=get_lss_layer_spec(layout=layout, ...))` and before training. It
    refuses (ValueError/TypeError) a model whose core attention is not `LSSCoreAttention` for this
    layout, `save_kv` and `overlap`, whose config disagrees with the group, whose max_sequence_length the layout cannot
    cut, or whose positional encoding it cannot make exact; then it keeps only this rank's rows of
    a learned position table (a sequence-local parameter: average its gradient over the data
    group only, see docs/megatron-lm.md) and makes RoPE use this rank's global positions.
    `layout` defaults to the one the spec built the layers with (`get_lss_layer_spec(layout=)`:
    one source of truth); given, it must agree; so do `save_kv` and `overlap`. Until this has run, an `LSSCoreAttention` on a
    group of N > 1 refuses to attend. Returns `model`."""
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"prepare_lss_model: layout {layout!r} is not one of {LAYOUTS}")
    if save_kv is not None and save_kv not in SAVE_KV:
        raise ValueError(f"prepare_lss_model: save_kv {save_kv!r} is not one of {SAVE_KV}")
    from ..lss.positions import distribute_positions

    gpt = _unwrap(model)
    cores = _check_attention(gpt, layout, save_kv=save_kv, overlap=overlap)
    layout = cores[0].layout
    group = cores[0].seq_group
    n, rank = group.size(), group.rank()
    _check_model(gpt, n, layout)
    distribute_positions(gpt, rank, n, layout)
    for core in cores:
        core.prepared = True
    return model


def prepare_sequence_model(model, *, layout: str | None, core: type, who: str, spec: str):
    """`prepare_lss_model`'s checks and position step for any core attention that splits the
    sequence over the context-parallel group by a layout (the ring's): `core` is its class,
    `spec` the layer-spec function that builds it and `who` the public name in messages.
    Returns `model`."""
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"{who}: layout {layout!r} is not one of {LAYOUTS}")
    from ..lss.positions import distribute_positions

    gpt = _unwrap(model, who)
    cores = _check_attention(gpt, layout, core, who, spec)
    layout = cores[0].layout
    group = cores[0].seq_group
    n, rank = group.size(), group.rank()
    _check_model(gpt, n, layout, who)
    distribute_positions(gpt, rank, n, layout)
    for c in cores:
        c.prepared = True
    return model


def _layer_spec(model, grid, kernel: str = "flash"):
    """The trainer's LSS spec; with tensor parallelism (T > 1) Megatron's TP runs with
    sequence_parallel inside each sequence rank, so its LayerNorms must accept it."""
    spec = get_lss_layer_spec(
        causal=model.causal,
        layout=grid.layout,
        kv_chunks=grid.kv_gather_chunks,
        kernel=kernel,
        save_kv=grid.lss_save_kv,
        fused_kv=grid.lss_kv_gather == "fused",
        overlap=grid.lss_overlap,
    )
    if grid.tp_size == 1:
        return spec
    from .sp_norms import with_sequence_parallel_norms

    return with_sequence_parallel_norms(spec, model.num_layers)


def _post_build(model, grid) -> None:
    prepare_lss_model(model, layout=grid.layout, save_kv=grid.lss_save_kv, overlap=grid.lss_overlap)


# --- cost model --------------------------------------------------------------------------------
def sp_plan(s, lay) -> list[Collective]:
    """Per layer and micro-batch: the all-gather of this rank's [K|V] (h_kv/T heads, in the
    compute dtype; again under recompute) and one reduce-scatter of [dK|dV] backward, in C head
    chunks each, on the N ranks of the sequence group (T apart); with T > 1 Megatron's TP on
    the segment's l/N tokens."""
    n, b, seg, c = lay.n, lay.micro_batch, s.seq // lay.n, lay.kv_chunks
    calls = 2 if lay.kv_separate else 1  # Megatron's all_gather CP: K and V apart
    kv = seg * b * 2 * (s.kv_heads // lay.t) * s.head_dim * lay.attn_bytes  # local [K | V]
    chunk = gather_bytes(kv // c // calls, n)
    fwd = forward_repeats(lay, comm_in_core=True)
    fwd += _regathers(lay)
    tp_fwd = forward_repeats(lay, comm_in_core=False)
    return [
        Collective("all_gather", chunk, n, s.layers * fwd * c * calls, stride=lay.t),
        Collective("reduce_scatter", chunk, n, s.layers * c * calls, stride=lay.t),
        *megatron_sp_plan(s, seg, b, lay.t, lay.act_bytes, tp_fwd),
    ]


def _regathers(lay) -> int:
    """Backward re-gathers of K/V per layer: one with --lss-save-kv local, unless Megatron's
    recompute already re-runs the gather in backward (the K/V are then used at once)."""
    return 1 if lay.local_kv and forward_repeats(lay, comm_in_core=True) == 1 else 0


def attention_shape(s, lay) -> tuple[int, int, int, int]:
    """Local queries (l/N) against all l keys, on this rank's h/T heads."""
    return s.heads // lay.t, s.kv_heads // lay.t, s.seq // lay.n, s.seq


def attention_saved(s, lay) -> int:
    """LSS core attention on this rank's h/T heads, flash: q, the gathered [K|V] buffer (or, with
    --lss-save-kv local, this rank's [k|v]), output (= proj input), lse; dense: contiguous copies of q and of the gathered K and V,
    probabilities [b, h, l/N, l] and masks [rows, l] per kernel call, output (= proj input).
    q, K/V and the output are in the compute dtype (`Layout.attn_bytes`)."""
    b, es, d, seg, ll = lay.micro_batch, lay.attn_bytes, s.head_dim, s.seq // lay.n, s.seq
    h, kvh = s.heads // lay.t, s.kv_heads // lay.t
    rope, grouped = not s.learned_positions, s.heads > s.kv_heads
    out = seg * b * h * d * es
    kv = ll * b * 2 * kvh * d * es  # the gathered [K | V] (zigzag: re-ordered inside the gather)
    if lay.attention_kernel == "materialized":
        calls = 2 if lay.zigzag else 1  # each zigzag chunk copies the whole (re-ordered) K, V
        total = seg * b * h * d * es + calls * kv + out
        total += probs_bytes(b, h, seg, ll, es)
        return total + (lay.kv_chunks * seg * ll * BOOL if s.causal else 0)
    q_view = not (rope or (grouped and kvh > 1) or lay.attn_cast)
    if not q_view:  # rope output, a copy of grouped heads, or the cast to the compute dtype
        q = seg * b * h * d * es
    else:
        q = seg * b * (h + 2 * kvh) * d * es  # a view of the fused QKV output
    if _regathers(lay):  # --lss-save-kv local: the local [k | v], or nothing more when k, v
        kv = 0 if q_view else seg * b * 2 * kvh * d * es  # are views of q's buffer
    total = q + kv + out + lse_bytes(b, h, seg, es)
    if (lay.zigzag or lay.kv_chunks > 1) and not lay.overlap:  # chunk outputs, then their
        total += out  # concatenation (proj input); the overlapped kernel writes one output
    return total


def kv_transient(s, lay) -> int | None:
    """The largest full-length K/V buffer that exists only transiently in one layer, the
    concatenated [dK | dV] of one gather before its reduce-scatter, l b 2 (h_kv / C) d es:
    C-fold smaller with --kv-gather-chunks C (the gathered K/V itself is saved for backward
    either way). None at N = 1."""
    if lay.n == 1:
        return None
    kv = s.kv_heads // lay.t // lay.kv_chunks  # this rank's heads of one chunk
    return s.seq * lay.micro_batch * 2 * kv * s.head_dim * lay.attn_bytes


def imbalance(s, lay) -> float:
    """max / mean over the sequence group of the (query, key) pairs each rank attends (the
    trainer's ``attention_imbalance``). Contiguous causal segments: rank r attends
    s_loc (r s_loc) + s_loc (s_loc + 1) / 2 pairs, so the last rank does most; zigzag (chunks r
    and 2N-1-r of length c = l/2N) gives every rank c^2 (2N-1) + c (c+1): 1.0."""
    n, seg = lay.n, s.seq // lay.n
    if not s.causal or n == 1 or lay.zigzag:
        return 1.0
    pairs = [seg * r * seg + seg * (seg + 1) // 2 for r in range(n)]
    return max(pairs) / (sum(pairs) / n)


# --- memory estimate ---------------------------------------------------------------------------
def estimate_attention(m, n: int, b: int, es: int, kernel: str) -> tuple[int, str]:
    """q, k, v of the segment, the gathered [K|V] of the whole sequence, the output (dense: the
    probabilities [b, h, l/N, l] and mask; flash: the log-sum-exp)."""
    ll, d, h, kv = m.seq_length, m.head_dim, m.num_heads, m.kv_heads
    seg = ll // n
    saved = seg * b * (h + 2 * kv) * d * es + ll * b * 2 * kv * d * es  # qkv, gathered [K|V]
    saved += seg * b * h * d * es  # output
    if kernel == "dense":
        saved += b * h * seg * ll * es + (seg * ll if m.causal else 0)
        return saved, "LSS dense attention (scores materialised)"
    return saved + b * h * seg * 4, "LSS flash attention"


MODE = Mode(
    name="lss",
    label="lss",
    colour="tab:blue",
    degree_group="context",
    layer_spec=_layer_spec,
    post_build=_post_build,
    composes_with_tp=True,
    options=("lss_layout", "kv_gather_chunks", "lss_save_kv", "lss_kv_gather", "lss_overlap"),
    documents=True,
    costs=Costs(
        sp_plan=sp_plan,
        attention_saved=attention_saved,
        attention_shape=attention_shape,
        comm_in_core=True,
        local_queries=True,
        overlap="overlap_kv_gather",
        kv_transient=kv_transient,
        imbalance=imbalance,
    ),
    estimate_attention=estimate_attention,
)
