"""Exact per-rank counts of the cost model: parameters, bytes communicated, bytes saved for backward.

Pure Python (no torch), so the model runs anywhere in milliseconds. Its formulas are its own (the
check on the trainer's counters), following what the trainer (`lss_megatron`) does and counts,
derived from its code and Megatron-Core 0.16's:

* bytes communicated use `lss_megatron.parallel.comm`'s convention (what one rank sends under ring
  algorithms on a group of n ranks): all-gather / reduce-scatter (n-1) x the local shard,
  all-reduce ``2 (n-1) M // n`` per call (integer floor division, as comm.py), all-to-all
  ``(n-1) M // n`` of the local tensor, point-to-point the bytes sent; groups of one rank cost 0;
* gradients are all-reduced in buckets of at most 25 MiB built over the parameters in reverse
  registration order (`lss_megatron.lss.grad_sync._buckets`);
* ``activation_bytes`` enumerates the unique storages autograd saves in one micro-batch's forward
  (`lss_megatron.training.metrics.SavedBytes`), tensor by tensor, for Megatron's local GPT layer.

LSS composes with Megatron tensor parallelism (``t`` > 1, the trainer's ``--tensor-parallel``):
Megatron's TP with ``sequence_parallel`` runs inside each sequence rank on l/N tokens (its
collectives are the nvidia-sp formulas on l/N tokens and a group of t), and the K/V gather
moves this rank's h_kv/t heads.

What differs between modes each mode declares (`lss_megatron.modes`, its `Mode.costs`: its
activation collectives, what its attention saves, the shape of its kernel call); this module
holds what every mode shares. Modes: the trainer's (``serial``, ``lss``, ``nvidia-sp``,
``ulysses``: exact) and the peers it does not run (`peers`: ``ring``, the same conventions applied
to ring attention's K/V passing, not validated against a counted run).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from lss_megatron.modes import MODES as TRAINER_MODES
from lss_megatron.modes import get_mode
from lss_megatron.modes.base import Mode
from lss_megatron.modes.costs import (
    BOOL,
    FP32,
    INT32,
    INT64,
    Collective,
    all_reduce_bytes,
    all_to_all_bytes,
    core_inputs_bytes,
    gather_bytes,
    probs_bytes,
)

from .peers import PEERS

__all__ = ["BOOL", "INT64", "all_to_all_bytes", "gather_bytes", "probs_bytes"]  # re-exported

MODES = (*TRAINER_MODES, *PEERS)
BUCKET_BYTES = 25 * 1024 * 1024
UPDATE_BYTES = {"adamw": 28, "sgd": 12}
"""Bytes the optimizer update moves per parameter (fp32 parameter, gradient and state, each read
and written: AdamW 4 + 4 + 2 x 4 read, 4 + 2 x 4 written; SGD parameter and gradient read, the
parameter written)."""


def mode_of(name: str) -> Mode:
    """The declaration of a trainer mode (`lss_megatron.modes.get_mode`) or a peer (`peers`)."""
    return PEERS[name] if name in PEERS else get_mode(name)


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}


@dataclass(frozen=True)
class Shape:
    """The GPT model (the trainer's `config.json` "model" section)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    seq: int
    vocab: int
    padded_vocab: int
    head_dim: int
    learned_positions: bool
    causal: bool


@dataclass(frozen=True)
class Layout:
    """How the P = N x D ranks split the work, and the batch of one step."""

    mode: str
    n: int  # sequence-parallel degree (lss, ulysses, ring: sequence group; nvidia-sp: TP size)
    d: int  # data-parallel replicas
    micro_batch: int  # B, sequences per forward/backward on one rank
    micro_batches: int  # M, micro-batches per optimizer step
    global_batch: int  # G
    act_bytes: int  # element size of activations (fp32 4, bf16/fp16 2)
    param_bytes: int = 4  # element size of the model's parameters (the bf16 model: 2)
    kernel: str = "auto"  # attention kernel: "flash" (no score tensor), "materialized", or auto
    recompute: str = "none"  # Megatron activation recompute: "none", "selective", "full"
    master_weights: bool = False  # bf16 model + fp32 master weights, gradients, optimizer state
    zigzag: bool = False  # LSS zigzag layout: rank n holds chunks n and 2N-1-n of 2N
    kv_chunks: int = 1  # LSS --kv-gather-chunks C: K/V gathered in C head chunks
    local_kv: bool = False  # LSS --lss-save-kv local: K/V kept local, re-gathered in backward
    kv_separate: bool = False  # LSS --lss-kv-gather separate: K and V in two calls each way
    overlap: bool = False  # LSS --lss-overlap: gathers / reduce-scatters behind the blocks
    zero_stage: int = 0  # --zero-stage: DeepSpeed ZeRO over the gradient group (0: off)
    t: int = 1  # lss --tensor-parallel T: Megatron TP with sequence_parallel inside each segment
    cpu: bool = False  # the trainer on CPU (gloo): bf16 LayerNorm keeps bf16 mean/rstd there

    @property
    def stats_elem(self) -> int:
        """Element size of LayerNorm's saved mean and rstd: fp32, but in the input dtype on CPU
        (torch 2.13's CPU layer_norm for bf16 input returns bf16 statistics)."""
        return self.act_bytes if self.cpu else max(self.act_bytes, FP32)

    @property
    def grad_elem(self) -> int:
        """Element size of gradients, their reduction and the optimizer state (fp32 under
        master weights, else the parameters')."""
        return FP32 if self.master_weights else self.param_bytes

    @property
    def world(self) -> int:
        return self.n * self.t * self.d

    @property
    def attn_bytes(self) -> int:
        """Element size of what LSS and Ulysses attention gather, exchange and save (q, K/V,
        output): the compute dtype (`lss.kernel.compute_dtype`, cast before any communication).
        The trainer's bf16 is Megatron's bf16 model, so that is the activations' dtype; a half
        dtype over fp32 parameters (``param_dtype`` fp32) computes in the half dtype too."""
        return self.act_bytes

    @property
    def attn_cast(self) -> bool:
        """A half compute dtype over wider parameters: q, k, v reach attention as cast copies
        (never views of the fused QKV output, whose bias add runs in the parameters' dtype)."""
        return self.act_bytes < self.param_bytes

    @cached_property
    def spec(self) -> Mode:
        """The mode's declaration (`mode_of`)."""
        return mode_of(self.mode)

    @property
    def tp(self) -> int:
        """Megatron's tensor-parallel size (nvidia-sp: N; lss: its --tensor-parallel T)."""
        return self.spec.tensor_parallel(self.n, self.t)

    @property
    def grad_group(self) -> int:
        """Ranks replicated weights are averaged over: all P / TP ranks of one tensor-parallel
        rank (the data group in nvidia-sp, the sequence x data group otherwise)."""
        return self.world // self.tp

    def tp_tokens(self, seq: int) -> int:
        """Tokens of a sequence in this rank's tensor-parallel regions (QKV, attention, MLP,
        loss): all l in serial and nvidia-sp, the segment l/N in modes that split the sequence."""
        return seq // self.n if self.spec.splits_sequence else seq

    @property
    def attention_kernel(self) -> str:
        """auto: the mode's `Costs.default_kernel` (Megatron's DotProductAttention, scores
        materialised, for serial and nvidia-sp; a memory-efficient kernel otherwise)."""
        if self.kernel != "auto":
            return self.kernel
        return self.spec.costs.default_kernel


def shape_from_config(model: dict) -> Shape:
    """`Shape` from the "model" section of the trainer's config.json."""
    heads = int(model["num_heads"])
    hidden = int(model["hidden_size"])
    kv = model.get("num_kv_heads") or heads
    ffn = model.get("ffn_hidden_size") or 4 * hidden
    vocab = int(model["vocab_size"])
    return Shape(
        layers=int(model["num_layers"]),
        hidden=hidden,
        heads=heads,
        kv_heads=int(kv),
        ffn=int(ffn),
        seq=int(model["seq_length"]),
        vocab=vocab,
        padded_vocab=int(model.get("padded_vocab_size") or vocab),
        head_dim=int(model.get("head_dim") or hidden // heads),
        learned_positions=model.get("position_embedding", "learned") == "learned",
        causal=bool(model.get("causal", True)),
    )


KERNEL_NAMES = {
    "flash": "flash",
    "dense": "materialized",
    "materialized": "materialized",
    "auto": "auto",
}
"""The trainer's ``--attention-kernel`` (and this model's own names) -> `Layout.kernel`."""


def layout_from_config(config: dict) -> Layout:
    """`Layout` from the "parallel" and "train" sections (the trainer's ``attention_kernel``,
    ``recompute``, ``dtype``), or for a hypothetical layout an optional "costmodel" section
    (`configs.make_config`'s; its ``attention_kernel``, ``auto`` by default: dense for serial
    and nvidia-sp, flash otherwise, as in the paper, overrides the trainer's; ``param_dtype``
    fp32 keeps fp32 parameters under a half dtype)."""
    par, train = config["parallel"], config["train"]
    extra = config.get("costmodel", {})
    dtype = train.get("dtype", "fp32")
    mode = par["mode"]
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    n = int(par.get("seq_parallel") or 1)
    t = int(par.get("tensor_parallel") or 1)
    d = int(par.get("data_parallel") or int(par["world_size"]) // (n * t))
    g = int(train["global_batch_size"])
    b = int(train.get("micro_batch_size") or g // d)
    m = int(train.get("num_micro_batches") or g // (d * b))
    half = dtype != "fp32" and extra.get("param_dtype") != "fp32"  # Megatron mixed precision
    return Layout(
        mode=mode,
        n=n,
        d=d,
        micro_batch=b,
        micro_batches=m,
        global_batch=g,
        act_bytes=DTYPE_BYTES[dtype],
        param_bytes=DTYPE_BYTES[dtype] if half else FP32,
        kernel=KERNEL_NAMES[
            extra.get("attention_kernel") or train.get("attention_kernel") or "auto"
        ],
        recompute=train.get("recompute") or "none",
        master_weights=half,
        zigzag=par.get("lss_layout", "contiguous") == "zigzag",
        kv_chunks=int(par.get("kv_gather_chunks") or 1)
        if "kv_gather_chunks" in mode_of(mode).options
        else 1,
        local_kv="lss_save_kv" in mode_of(mode).options
        and par.get("lss_save_kv", "gathered") == "local",
        kv_separate="lss_kv_gather" in mode_of(mode).options
        and par.get("lss_kv_gather", "fused") == "separate",
        overlap="lss_overlap" in mode_of(mode).options and bool(par.get("lss_overlap", False)),
        zero_stage=int(train.get("zero_stage") or 0),
        t=t,
        cpu=config.get("runtime", {}).get("backend") == "gloo",
    )


# --- parameters ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    name: str
    numel: int
    tp_partial: bool = False  # Megatron's `sequence_parallel` tag: grads summed over TP first
    seq_local: bool = False  # LSS position slice: averaged over the data group only


def parameters(s: Shape, lay: Layout) -> list[Param]:
    """This rank's parameters in `GPTModel.parameters()` order (biases on, untied embeddings)."""
    t = lay.tp
    sp = t > 1  # Megatron's sequence_parallel (nvidia-sp, and LSS x TP)
    e, qkv = s.hidden, (s.heads + 2 * s.kv_heads) * s.head_dim
    out = [Param("embedding.word_embeddings.weight", s.padded_vocab // t * e)]
    if s.learned_positions:  # sequence-distributed in every mode that splits the sequence
        local = lay.spec.splits_sequence
        rows = s.seq // lay.n if local else s.seq
        out.append(Param("embedding.position_embeddings.weight", rows * e, seq_local=local))
    for i in range(s.layers):
        p = f"decoder.layers.{i}."
        out += [
            Param(p + "input_layernorm.weight", e, tp_partial=sp),
            Param(p + "input_layernorm.bias", e, tp_partial=sp),
            Param(p + "self_attention.linear_proj.weight", e * s.heads * s.head_dim // t),
            Param(p + "self_attention.linear_proj.bias", e, tp_partial=sp),
            Param(p + "self_attention.linear_qkv.weight", qkv // t * e),
            Param(p + "self_attention.linear_qkv.bias", qkv // t),
            Param(p + "pre_mlp_layernorm.weight", e, tp_partial=sp),
            Param(p + "pre_mlp_layernorm.bias", e, tp_partial=sp),
            Param(p + "mlp.linear_fc1.weight", s.ffn // t * e),
            Param(p + "mlp.linear_fc1.bias", s.ffn // t),
            Param(p + "mlp.linear_fc2.weight", e * s.ffn // t),
            Param(p + "mlp.linear_fc2.bias", e, tp_partial=sp),
        ]
    out += [
        Param("decoder.final_layernorm.weight", s.hidden, tp_partial=sp),
        Param("decoder.final_layernorm.bias", s.hidden, tp_partial=sp),
        Param("output_layer.weight", s.padded_vocab // t * e),
    ]
    return out


def buckets(sizes: list[int], bucket_bytes: int = BUCKET_BYTES) -> list[int]:
    """Bucket byte sizes as `grad_sync._buckets` forms them (reverse order, <= bucket_bytes)."""
    out: list[int] = []
    cur = 0
    started = False
    for nbytes in reversed(sizes):
        if started and cur + nbytes > bucket_bytes:
            out.append(cur)
            cur = 0
        cur += nbytes
        started = True
    if started:
        out.append(cur)
    return out


# --- communication per optimizer step ------------------------------------------------------------
def sp_plan(s: Shape, lay: Layout) -> list[Collective]:
    """Activation collectives (category sp) of one micro-batch's forward and backward, this rank:
    the mode's own (`Costs.sp_plan`)."""
    return lay.spec.costs.sp_plan(s, lay)


def sp_bytes_per_micro_batch(s: Shape, lay: Layout) -> int:
    """Activation traffic (category sp) of one micro-batch's forward and backward, this rank."""
    return sum(c.total_bytes for c in sp_plan(s, lay))


def sp_calls_per_micro_batch(s: Shape, lay: Layout) -> int:
    return sum(c.total_calls for c in sp_plan(s, lay))


def grad_plan(s: Shape, lay: Layout) -> list[Collective]:
    """The gradient reduction of one step (`grad_sync.GradientAverager`): bucketed all-reduces of
    the gradients (element size `Layout.grad_elem`: fp32 under bf16 master weights) in 25 MiB
    buckets, one call per bucket: first Megatron's sums of sequence-parallel (`tp_partial`)
    gradients over the tensor-parallel group (consecutive ranks), then the replicated
    parameters over the gradient group (the TP ranks apart), then the sequence-local position
    rows over the data group (N x TP ranks apart). The counters' check (`grad_comm`) and the
    time model (`steptime`) both read it."""
    params = parameters(s, lay)
    groups = [
        ([p for p in params if p.tp_partial], lay.tp, 1),
        ([p for p in params if not p.seq_local], lay.grad_group, lay.tp),
        ([p for p in params if p.seq_local], lay.d, lay.n * lay.t),
    ]
    return [
        Collective("all_reduce", all_reduce_bytes(x, n), n, stride=stride)
        for ps, n, stride in groups
        if ps and n > 1
        for x in buckets([p.numel * lay.grad_elem for p in ps])
    ]


def grad_comm(s: Shape, lay: Layout) -> tuple[int, int]:
    """(bytes, calls) of gradient synchronisation per step (`grad_plan`)."""
    plan = grad_plan(s, lay)
    return sum(c.total_bytes for c in plan), sum(c.total_calls for c in plan)


def other_comm(s: Shape, lay: Layout) -> tuple[int, int]:
    """(bytes, calls) per step: the fp64 loss all-reduce and the global-norm partial sums."""
    parts = [all_reduce_bytes(8, lay.grad_group)]
    if lay.spec.splits_sequence:
        parts.append(all_reduce_bytes(8, lay.n))  # sequence-local squared norms
    parts.append(all_reduce_bytes(8, lay.tp))  # tensor-parallel squared norms
    return sum(parts), sum(1 for x in parts if x)


# --- bytes saved for backward (one micro-batch, this rank) -----------------------------------------
def _attention_saved(s: Shape, lay: Layout) -> int:
    """One layer's attention block between QKV and the output projection (RoPE included)."""
    b, es, d = lay.micro_batch, lay.act_bytes, s.head_dim
    tokens = lay.tp_tokens(s.seq)  # tokens of q, k, v
    rope = 4 * tokens * d * es if not s.learned_positions else 0  # cos, sin for q and for k
    if lay.recompute == "selective":  # Megatron's checkpoint keeps q, k, v and a mask-type int
        hp, kvp = s.heads // lay.tp, s.kv_heads // lay.tp
        proj_input = tokens * b * hp * d * es
        return rope + core_inputs_bytes(s, lay, tokens, hp, kvp) + INT32 + proj_input
    return rope + lay.spec.costs.attention_saved(s, lay)


def activation_bytes(s: Shape, lay: Layout) -> int:
    """Bytes autograd saves for one micro-batch's forward on this rank (unique storages)."""
    t, b, es, ll = lay.tp, lay.micro_batch, lay.act_bytes, s.seq
    tp_tokens = lay.tp_tokens(ll)  # tokens in TP regions (l, or the segment l/N)
    local = tp_tokens // t  # tokens in norm / residual regions (split t ways by SP)
    hidden = local * b * s.hidden * es
    stats = 2 * local * b * lay.stats_elem  # LayerNorm mean and rstd

    extra = 0
    if lay.recompute == "full":  # Megatron's checkpoint keeps each layer's input only, and the
        per_layer = hidden  # rotary angles [tokens, 1, 1, d] (fp32, one tensor for all layers)
        extra = tp_tokens * s.head_dim * FP32 if not s.learned_positions else 0
    else:
        per_layer = 2 * (hidden + stats)  # input_layernorm, pre_mlp_layernorm inputs
        per_layer += 2 * hidden  # inputs of linear_qkv and linear_fc1 (local shard under SP)
        per_layer += 2 * tp_tokens * b * (s.ffn // t) * es  # GeLU input, linear_fc2 input
        per_layer += _attention_saved(s, lay)

    emb_tokens = tp_tokens  # the embedding runs before the sequence-parallel scatter
    embed = b * emb_tokens * INT64  # token ids (masked copy under TP)
    embed += b * emb_tokens * BOOL if t > 1 else 0  # out-of-shard vocabulary mask
    embed += b * emb_tokens * INT64 if s.learned_positions else 0  # position ids
    final = hidden + stats + hidden  # final layernorm input, output layer input
    # fp32 softmax (Megatron's cross-entropy casts the logits), mask, targets
    loss = tp_tokens * b * ((s.padded_vocab // t) * FP32 + BOOL + INT64)
    return s.layers * per_layer + embed + final + loss + extra


def param_count(s: Shape, lay: Layout) -> int:
    return sum(p.numel for p in parameters(s, lay))


def optimizer_state_bytes(s: Shape, lay: Layout, optimizer: str) -> int:
    """torch AdamW: exp_avg and exp_avg_sq like the (master) parameter, plus a 4-byte step per
    tensor; SGD without momentum keeps no state."""
    if optimizer != "adamw":
        return 0
    ps = parameters(s, lay)
    return sum(2 * p.numel * lay.grad_elem + FP32 for p in ps)


# --- FLOPs ---------------------------------------------------------------------------------------
def attention_pairs(seq: int, causal: bool) -> int:
    return seq * (seq + 1) // 2 if causal else seq * seq


def model_flops_per_step(s: Shape, global_batch: int) -> int:
    """The trainer's `metrics.model_flops_per_step`: 3 x forward over G sequences."""
    d, kv = s.head_dim, s.kv_heads
    per_token = (
        s.layers
        * (
            2 * s.hidden * (s.heads * d + 2 * kv * d)
            + 2 * s.heads * d * s.hidden
            + 4 * s.hidden * s.ffn
        )
        + 2 * s.hidden * s.vocab
    )
    attention = s.layers * 4 * s.heads * d * attention_pairs(s.seq, s.causal)
    return 3 * global_batch * (s.seq * per_token + attention)


# --- packed documents (--reset-attention-mask) -------------------------------------------------
def expected_visible_keys(document_lengths, seq: int):
    """[seq] float: the expected number of keys the query at sequence position p sees under
    document masks, for documents whose lengths (tokens, EOD included) follow the empirical
    distribution `document_lengths`, packed in random order and cut into sequences of `seq`
    (Megatron's GPTDataset). A random token lies in a document of length D with probability
    proportional to D, at a uniform offset A in [0, D): P(A = a) = P(D > a) / E[D] (renewal
    theory). It sees min(A, p) + 1 keys: A within its document, at most p within the sequence."""
    import numpy as np

    d = np.asarray(document_lengths, dtype=np.int64)
    if d.size == 0 or d.min() < 1:
        raise ValueError("document lengths must be >= 1 (and at least one)")
    m = int(d.max())
    counts = np.bincount(d, minlength=m + 1).astype(float)  # [m + 1]
    survival = 1.0 - np.cumsum(counts) / d.size  # [m + 1]: P(D > a)
    p_age = survival[:m] / d.mean()  # [m]: P(A = a)
    tail = p_age[::-1].cumsum()[::-1]  # [m]: P(A >= k)
    ge = np.zeros(seq)
    k = min(m, seq)
    ge[1:k] = tail[1:k]  # P(A >= k) for k = 1 .. seq-1
    return 1.0 + np.cumsum(ge)  # [seq]: 1 + sum_{k=1..p} P(A >= k) = E[min(A, p)] + 1


def document_attention_fraction(document_lengths, seq: int) -> float:
    """Expected attention pairs under document masks over plain causal pairs
    (`expected_visible_keys`): the trainer's ``attention_flops_vs_causal``."""
    return float(expected_visible_keys(document_lengths, seq).sum()) / attention_pairs(seq, True)


def document_attention_imbalance(document_lengths, s: Shape, lay: Layout) -> float | None:
    """LSS under document masks: max / mean over the sequence group of the expected pairs each
    rank attends (its positions' `expected_visible_keys`); None for modes that do not report an
    imbalance (`Costs.imbalance`)."""
    if lay.spec.costs.imbalance(s, lay) is None:
        return None
    from lss_megatron.layout import segment_chunks

    keys = expected_visible_keys(document_lengths, s.seq)
    layout = "zigzag" if lay.zigzag else "contiguous"
    pairs = [
        sum(keys[lo:hi].sum() for lo, hi in segment_chunks(s.seq, r, lay.n, layout))
        for r in range(lay.n)
    ]
    return float(max(pairs) / (sum(pairs) / lay.n))


# --- beyond the paper: causal balance, chunked K/V gathers, ZeRO ---------------------------------
def attention_imbalance(s: Shape, lay: Layout) -> float | None:
    """LSS: max / mean over the sequence group of the (query, key) pairs each rank attends (the
    trainer's ``attention_imbalance``, `Costs.imbalance`); None for modes that do not report it."""
    return lay.spec.costs.imbalance(s, lay)


def kv_transient_bytes(s: Shape, lay: Layout) -> int | None:
    """LSS: the largest full-length K/V buffer that exists only transiently in one layer
    (`Costs.kv_transient`: one gather's [dK | dV], C-fold smaller with --kv-gather-chunks C; the
    gathered K/V itself is saved for backward either way, so it is in ``activation_bytes``);
    None for other modes. An indicator of what chunking saves, not the whole measured
    ``transient_peak_bytes`` (which also holds everything else step 1 allocates)."""
    return lay.spec.costs.kv_transient(s, lay)


def transient_bytes(s: Shape, lay: Layout) -> int:
    """An estimate (not a count) of the largest attention transient beyond the saved bytes: what
    one layer's attention backward holds at once on this rank, for the memory-fits checks.

    * the core's input gradients: dq over its queries and dK, dV over all its keys (LSS: the
      full-length [dK | dV] of one gather, `kv_transient_bytes`, before its reduce-scatter; with
      --lss-save-kv local also the K/V re-gathered for the backward);
    * with materialised scores, also the probabilities' gradient (in the element sizes the
      probabilities are saved in, `_probs`: es, plus fp32 under Megatron's fp32 softmax) and
      the scores' gradient (es), [b, heads, queries, keys] each. A flash kernel's blockwise
      transients are tiles, left out.
    """
    b, es, d = lay.micro_batch, lay.attn_bytes, s.head_dim
    heads, kvh, queries, keys = lay.spec.costs.attention_shape(s, lay)
    grads = queries * b * heads * d * es
    kv = kv_transient_bytes(s, lay)
    grads += kv if kv is not None else keys * b * 2 * kvh * d * es
    if lay.local_kv and lay.recompute == "none" and lay.n > 1:  # --lss-save-kv local: the
        chunks = 2 if lay.overlap and lay.kv_chunks > 1 else 1  # re-gathered K/V of the chunk
        grads += chunks * keys * b * 2 * kvh * d * es // lay.kv_chunks  # in backward (and the
        # next one's, in flight, under --lss-overlap)
    if lay.attention_kernel != "materialized":
        return grads
    return grads + probs_bytes(b, heads, queries, keys, es) + b * heads * queries * keys * es


ZERO_ALIGNMENT = 2
"""DeepSpeed's ``nccl_start_alignment_factor``: each flat parameter group is padded to a multiple
of 2 x (group size) elements before it is cut into equal partitions."""


def zero_parameters(s: Shape, lay: Layout) -> list[Param]:
    """Parameters under ZeRO: the learned position table is replicated whole, [l, E], on every
    rank of a sequence-splitting mode (`lss_megatron.training.zero.replicate_positions`)."""
    ps = parameters(s, lay)
    return [Param(p.name, s.seq * s.hidden) if p.seq_local else p for p in ps]


def zero_counts(s: Shape, lay: Layout, optimizer: str) -> dict:
    """Per-rank (rank 0) memory and gradient traffic of DeepSpeed ZeRO stage 1 / 2 over the
    gradient group (all P ranks; the D replicas in nvidia-sp), one flat parameter group:

    * ``optimizer_state_bytes``: AdamW's two moments of this rank's partition, padded elements
      included (the flat buffer is padded to a multiple of 2 x group, then cut into equal
      partitions), plus one 4-byte step; about 1/P of the plain run;
    * ``grad_bytes``: stage 1 every gradient; stage 2 the whole gradients of the parameters that
      overlap rank 0's partition (what the trainer counts before the step: DeepSpeed keeps
      a parameter's full ``.grad`` until its bucket is reduced), between 1/P and 1/P + one tensor;
    * ``grad_comm_bytes`` / ``_calls``: the gradients all-reduced in 25 MiB buckets (stage 1 once
      per step, stage 2 after every micro-batch's backward), the updated partitions all-gathered,
      and DeepSpeed's fp32 norm all-reduced (category grad). Exact for the runs counted so far (one bucket, no
      padding); with several buckets or padding the bucket boundaries may differ slightly.
      None for nvidia-sp (its tensor-parallel gradient sums are not modelled under ZeRO).
    """
    ps = zero_parameters(s, lay)
    group = lay.grad_group
    pb = lay.param_bytes
    numel = sum(p.numel for p in ps)
    align = ZERO_ALIGNMENT * group
    part = -(-numel // align) * align // group  # elements of one rank's partition
    held, start = 0, 0
    for p in ps:  # rank 0's partition is [0, part) of the flat buffer, in registration order
        if start < part:
            held += p.numel
        start += p.numel
    out: dict = {
        "param_bytes": numel * pb,
        "grad_bytes": (numel if lay.zero_stage == 1 else held) * pb,
        "optimizer_state_bytes": 2 * part * lay.grad_elem + FP32 if optimizer == "adamw" else 0,
        "grad_comm_bytes": None,
        "grad_comm_calls": None,
        # DeepSpeed computes the norm: only the loss all-reduce is left in category other
        "other_comm_bytes": all_reduce_bytes(8, group),
        "other_comm_calls": 1 if group > 1 else 0,
    }
    if lay.tp == 1 and group > 1:
        bs = buckets([p.numel * pb for p in ps])
        reductions = 1 if lay.zero_stage == 1 else lay.micro_batches
        out["grad_comm_bytes"] = (
            reductions * sum(all_reduce_bytes(x, group) for x in bs)
            + gather_bytes(part * pb, group)
            + all_reduce_bytes(FP32, group)
        )
        out["grad_comm_calls"] = reductions * len(bs) + 2
    elif group == 1:
        out["grad_comm_bytes"], out["grad_comm_calls"] = 0, 0
    return out
