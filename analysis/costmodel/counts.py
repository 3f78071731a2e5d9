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

Modes: ``serial``, ``lss``, ``nvidia-sp`` (what the trainer runs: exact), ``ulysses`` and ``ring``
(peers at paper scale: the same conventions applied to DeepSpeed-Ulysses' four all-to-alls per
layer and ring attention's K/V passing, not validated against a counted run).
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("serial", "lss", "nvidia-sp", "ulysses", "ring")
SEQUENCE_MODES = ("lss", "ulysses", "ring")
"""Modes whose sequence group splits every sequence into N segments (TP = 1): positions are
sequence-distributed and gradients doubly averaged as in LSS (the trainer's Ulysses does so)."""
BUCKET_BYTES = 25 * 1024 * 1024
INT64, INT32, BOOL, FP32 = 8, 4, 1, 4
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

    @property
    def tp(self) -> int:
        """Megatron's tensor-parallel size."""
        return self.n if self.mode == "nvidia-sp" else self.t

    @property
    def grad_group(self) -> int:
        """Ranks replicated weights are averaged over: the data group in nvidia-sp, the
        sequence x data group (all P / T ranks of one tensor-parallel rank) otherwise."""
        return self.d if self.mode == "nvidia-sp" else self.n * self.d

    def tp_tokens(self, seq: int) -> int:
        """Tokens of a sequence in this rank's tensor-parallel regions (QKV, attention, MLP,
        loss): all l in serial and nvidia-sp, the segment l/N in sequence modes."""
        return seq if self.mode in ("serial", "nvidia-sp") else seq // self.n

    @property
    def attention_kernel(self) -> str:
        """auto: Megatron's DotProductAttention (scores materialised) for serial and nvidia-sp, a
        memory-efficient kernel (LSS's cpu_flash / sdpa, ring's and Ulysses' flash) otherwise."""
        if self.kernel != "auto":
            return self.kernel
        return "materialized" if self.mode in ("serial", "nvidia-sp") else "flash"


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
        kv_chunks=int(par.get("kv_gather_chunks") or 1) if mode == "lss" else 1,
        local_kv=mode == "lss" and par.get("lss_save_kv", "gathered") == "local",
        kv_separate=mode == "lss" and par.get("lss_kv_gather", "fused") == "separate",
        overlap=mode == "lss" and bool(par.get("lss_overlap", False)),
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
        local = lay.mode in SEQUENCE_MODES
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


def all_reduce_bytes(nbytes: int, n: int) -> int:
    return 2 * (n - 1) * nbytes // n if n > 1 else 0


def gather_bytes(local_nbytes: int, n: int) -> int:
    """All-gather of a local shard, or reduce-scatter into one: (n-1) x the local shard."""
    return (n - 1) * local_nbytes if n > 1 else 0


def all_to_all_bytes(local_nbytes: int, n: int) -> int:
    return (n - 1) * local_nbytes // n if n > 1 else 0


# --- communication per optimizer step ------------------------------------------------------------
def megatron_sp_bytes(s: Shape, tokens: int, b: int, t: int, es: int, fwd: int = 1) -> int:
    """Megatron TP of degree t with sequence_parallel on `tokens` tokens per sequence (nvidia-sp:
    l; LSS x TP: l/N): its gathers, reduce-scatters and all-reduces of one micro-batch; `fwd`:
    how often the layers' forward collectives run (2 under full recompute)."""
    if t == 1:
        return 0
    u = gather_bytes(tokens // t * b * s.hidden * es, t)  # one sequence-parallel AG or RS
    # per layer: forward AG before QKV and FC1, RS after proj and FC2 (4, x fwd); backward the
    # adjoints (4) plus Megatron's re-gather of QKV's and FC1's inputs for weight grads (2)
    total = s.layers * (4 * fwd + 6) * u
    total += 3 * u  # output layer: AG forward, re-gather and RS of the input grad backward
    # vocab-parallel cross-entropy in fp32 (Megatron casts the logits): max, target, sum-exp
    total += 3 * all_reduce_bytes(tokens * b * FP32, t)
    if s.learned_positions:  # word embedding all-reduce, then scatter (backward: AG)
        total += all_reduce_bytes(b * tokens * s.hidden * es, t) + u
    else:  # embedding reduce-scatter straight into the sequence shard (backward: AG)
        total += 2 * u
    return total


def _forward_repeats(lay: Layout) -> int:
    """How often a layer's forward communication runs per micro-batch: twice under recompute
    (Megatron re-runs the checkpointed part in backward). LSS and Ulysses communicate inside the
    core attention, so selective and full recompute both repeat it; nvidia-sp's sequence-parallel
    collectives sit around the linear layers, so only full recompute repeats them."""
    if lay.recompute == "full" or (lay.recompute == "selective" and lay.mode != "nvidia-sp"):
        return 2
    return 1


def sp_bytes_per_micro_batch(s: Shape, lay: Layout) -> int:
    """Activation traffic (category sp) of one micro-batch's forward and backward, this rank."""
    n, b, es, ll = lay.n, lay.micro_batch, lay.act_bytes, s.seq
    if n == 1 and lay.tp == 1:
        return 0
    seg = ll // n
    fwd = _forward_repeats(lay)
    tp_fwd = 2 if lay.recompute == "full" else 1  # Megatron's TP collectives around the linears
    kes = lay.attn_bytes if lay.mode in ("lss", "ulysses") else es  # q, k, v cast to the
    # compute dtype before they travel (Megatron's own TP traffic stays in es)
    kv = seg * b * 2 * (s.kv_heads // lay.t) * s.head_dim * kes  # local [K | V], h_kv/T heads
    if lay.mode == "lss":  # all-gather of [K|V] per forward (x fwd), one reduce-scatter backward
        return s.layers * (fwd + 1 + _regathers(lay)) * gather_bytes(kv, n) + megatron_sp_bytes(
            s, seg, b, lay.t, es, tp_fwd
        )
    if lay.mode == "ring":  # forward passes K/V n-1 times; backward K/V and dK/dV n-1 times each
        return s.layers * 3 * (n - 1) * kv
    if lay.mode == "ulysses":  # q, k, v and output all-to-all, forward (x fwd) and backward
        q = seg * b * s.heads * s.head_dim * kes
        k = seg * b * s.kv_heads * s.head_dim * kes
        per_dir = 2 * all_to_all_bytes(q, n) + 2 * all_to_all_bytes(k, n)
        return s.layers * (fwd + 1) * per_dir
    if lay.mode == "nvidia-sp":
        return megatron_sp_bytes(s, ll, b, n, es, fwd)
    return 0


def _regathers(lay: Layout) -> int:
    """LSS's backward re-gathers of K/V per layer: one with --lss-save-kv local, unless Megatron's
    recompute already re-runs the gather in backward (then the K/V are used at once)."""
    return 1 if lay.local_kv and _forward_repeats(lay) == 1 else 0


def sp_calls_per_micro_batch(s: Shape, lay: Layout) -> int:
    tp_fwd = 2 if lay.recompute == "full" else 1  # Megatron's TP forward collectives repeat
    # only under full recompute (they sit around the linear layers)
    megatron = (4 * tp_fwd + 6) * s.layers + 3 + 3 + 2 if lay.tp > 1 else 0  # TP + SP calls
    if lay.n == 1:
        return megatron
    fwd = _forward_repeats(lay)
    return {
        "lss": (fwd + 1 + _regathers(lay))
        * s.layers
        * lay.kv_chunks
        * (2 if lay.kv_separate else 1)
        + megatron,
        "ring": 3 * (lay.n - 1) * s.layers,
        "ulysses": 4 * (fwd + 1) * s.layers,
        "nvidia-sp": megatron,
    }.get(lay.mode, 0)


def grad_comm(s: Shape, lay: Layout) -> tuple[int, int]:
    """(bytes, calls) of gradient synchronisation per step (`grad_sync.GradientAverager`)."""
    params = parameters(s, lay)
    pb = lay.grad_elem

    def reduce(ps: list[Param], n: int) -> tuple[int, int]:
        if n <= 1:
            return 0, 0
        bs = buckets([p.numel * pb for p in ps])
        return sum(all_reduce_bytes(x, n) for x in bs), len(bs)

    groups: list[tuple[list[Param], int]] = []
    if lay.tp > 1:
        groups.append(([p for p in params if p.tp_partial], lay.tp))  # TP sums first
    groups.append(([p for p in params if not p.seq_local], lay.grad_group))
    groups.append(([p for p in params if p.seq_local], lay.d))
    total = [reduce(ps, n) for ps, n in groups if ps]
    return sum(x for x, _ in total), sum(c for _, c in total)


def other_comm(s: Shape, lay: Layout) -> tuple[int, int]:
    """(bytes, calls) per step: the fp64 loss all-reduce and the global-norm partial sums."""
    parts = [all_reduce_bytes(8, lay.grad_group)]
    if lay.mode in SEQUENCE_MODES:
        parts.append(all_reduce_bytes(8, lay.n))  # sequence-local squared norms
    parts.append(all_reduce_bytes(8, lay.tp))  # tensor-parallel squared norms
    return sum(parts), sum(1 for x in parts if x)


# --- bytes saved for backward (one micro-batch, this rank) -----------------------------------------
def _lse(b: int, heads: int, tokens: int, es: int) -> int:
    """A flash kernel's log-sum-exp [b, heads, tokens]: fp32 (fp64 for fp64 inputs)."""
    return b * heads * tokens * (8 if es == 8 else FP32)


def _probs(b: int, heads: int, rows: int, keys: int, es: int) -> int:
    """Saved probabilities [b, heads, rows, keys]; bf16/fp16 also keep the fp32 softmax output
    (Megatron's ``attention_softmax_in_fp32``)."""
    return b * heads * rows * keys * (es + (FP32 if es < FP32 else 0))


def _core_inputs(s: Shape, lay: Layout, tokens: int, hp: int, kvp: int) -> int:
    """Storages behind q, k and v as Megatron hands them to the core attention (tokens, hp query
    and kvp key/value heads on this rank): the fused QKV output (v is always a view of it), plus
    q's copy when the head split or RoPE makes one, plus k's RoPE output."""
    b, es, d = lay.micro_batch, lay.act_bytes, s.head_dim
    rope = not s.learned_positions
    total = tokens * b * (hp + 2 * kvp) * d * es
    if rope or (hp > kvp > 1):
        total += tokens * b * hp * d * es
    return total + (tokens * b * kvp * d * es if rope else 0)


def _dpa_saved(s: Shape, lay: Layout, sq: int) -> int:
    """Megatron's DotProductAttention on hp = h/t heads over sq tokens (serial, nvidia-sp)."""
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
    return total + _probs(b, hp, sq, sq, es) + full  # probabilities, context (proj input)


def _flash_saved(s: Shape, lay: Layout, sq: int) -> int:
    """`FlashCoreAttention` on hp = h/t heads over sq tokens (serial, nvidia-sp): its inputs
    q, k, v, the output (= the projection's input) and the log-sum-exp."""
    hp, kvp, b = s.heads // lay.tp, s.kv_heads // lay.tp, lay.micro_batch
    out = sq * b * hp * s.head_dim * lay.act_bytes
    return _core_inputs(s, lay, sq, hp, kvp) + out + _lse(b, hp, sq, lay.act_bytes)


def _lss_saved(s: Shape, lay: Layout) -> int:
    """LSS core attention on this rank's h/T heads, flash: q, the gathered [K|V] buffer, output
    (= proj input), lse; dense: contiguous copies of q and of the gathered K and V,
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
        total += _probs(b, h, seg, ll, es)
        return total + (lay.kv_chunks * seg * ll * BOOL if s.causal else 0)
    q_view = not (rope or (grouped and kvh > 1) or lay.attn_cast)
    if not q_view:  # rope output, a copy of grouped heads, or the cast to the compute dtype
        q = seg * b * h * d * es
    else:
        q = seg * b * (h + 2 * kvh) * d * es  # a view of the fused QKV output
    if lay.local_kv and _forward_repeats(lay) == 1:  # the local [k | v], or nothing more when
        kv = 0 if q_view else seg * b * 2 * kvh * d * es  # k, v are views of q's buffer
    total = q + kv + out + _lse(b, h, seg, es)
    if (lay.zigzag or lay.kv_chunks > 1) and not lay.overlap:  # chunk outputs, then their
        total += out  # concatenation (proj input); the overlapped kernel writes one output
    return total


def _sequence_local_core_saved(s: Shape, lay: Layout) -> int:
    """Ulysses (all heads' tokens after the all-to-all, h/N heads) and ring attention cores."""
    b, es, d, n, ll = lay.micro_batch, lay.act_bytes, s.head_dim, lay.n, s.seq
    seg = ll // n
    if lay.mode == "ulysses":  # q, k, v on [l, b, h/N, d] (dense: their copies), proj input
        es = lay.attn_bytes  # q, k, v cast to the compute dtype before the all-to-alls
        h, kv = s.heads // n, max(1, s.kv_heads // n)
        core = ll * b * (h + 2 * kv) * d * es + seg * b * s.heads * d * es
        if lay.attention_kernel == "materialized":  # probabilities, mask; the output is not saved
            return core + _probs(b, h, ll, ll, es) + (ll * ll * BOOL if s.causal else 0)
        return core + ll * b * h * d * es + _lse(b, h, ll, es)  # flash: output, lse
    # ring: q, local k, v, out, lse (kv blocks of other ranks are received, not saved)
    return seg * b * (2 * s.heads + 2 * s.kv_heads) * d * es + b * s.heads * seg * FP32


def _attention_saved(s: Shape, lay: Layout) -> int:
    """One layer's attention block between QKV and the output projection (RoPE included)."""
    b, es, d, n, ll = lay.micro_batch, lay.act_bytes, s.head_dim, lay.n, s.seq
    tokens = ll if lay.mode in ("serial", "nvidia-sp") else ll // n  # tokens of q, k, v
    rope = 4 * tokens * d * es if not s.learned_positions else 0  # cos, sin for q and for k
    if lay.recompute == "selective":  # Megatron's checkpoint keeps q, k, v and a mask-type int
        hp, kvp = s.heads // lay.tp, s.kv_heads // lay.tp
        proj_input = tokens * b * hp * d * es
        return rope + _core_inputs(s, lay, tokens, hp, kvp) + INT32 + proj_input
    if lay.mode == "lss":
        return rope + _lss_saved(s, lay)
    if lay.mode in ("serial", "nvidia-sp"):
        dense = lay.attention_kernel == "materialized"
        return rope + (_dpa_saved(s, lay, ll) if dense else _flash_saved(s, lay, ll))
    return rope + _sequence_local_core_saved(s, lay)


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


# --- beyond the paper: causal balance, chunked K/V gathers, ZeRO ---------------------------------
def attention_imbalance(s: Shape, lay: Layout) -> float | None:
    """LSS: max / mean over the sequence group of the (query, key) pairs each rank attends (the
    trainer's ``attention_imbalance``); None for other modes. Contiguous causal segments: rank r
    attends s_loc (r s_loc) + s_loc (s_loc + 1) / 2 pairs, so the last rank does most; zigzag
    (chunks r and 2N-1-r of length c = l/2N) gives every rank c^2 (2N-1) + c (c+1): 1.0."""
    if lay.mode != "lss":
        return None
    n, seg = lay.n, s.seq // lay.n
    if not s.causal or n == 1 or lay.zigzag:
        return 1.0
    pairs = [seg * r * seg + seg * (seg + 1) // 2 for r in range(n)]
    return max(pairs) / (sum(pairs) / n)


def kv_transient_bytes(s: Shape, lay: Layout) -> int | None:
    """LSS: the largest full-length K/V buffer that exists only transiently in one layer, the
    concatenated [dK | dV] of one gather before its reduce-scatter, l b 2 (h_kv / C) d es: C-fold
    smaller with --kv-gather-chunks C (the gathered K/V itself is saved for backward either way,
    so it is in ``activation_bytes``). None for other modes. An indicator of what chunking saves,
    not the whole measured ``transient_peak_bytes`` (which also holds everything else step 1
    allocates)."""
    if lay.mode != "lss" or lay.n == 1:
        return None
    kv = s.kv_heads // lay.t // lay.kv_chunks  # this rank's heads of one chunk
    return s.seq * lay.micro_batch * 2 * kv * s.head_dim * lay.attn_bytes


def transient_bytes(s: Shape, lay: Layout) -> int:
    """An estimate (not a count) of the largest attention transient beyond the saved bytes: what
    one layer's attention backward holds at once on this rank, for the memory-fits checks.

    * the core's input gradients: dq over its queries and dK, dV over all its keys (LSS: the
      full-length [dK | dV] of one gather, `kv_transient_bytes`, before its reduce-scatter);
    * with materialised scores, also the probabilities' gradient (in the element sizes the
      probabilities are saved in, `_probs`: es, plus fp32 under Megatron's fp32 softmax) and
      the scores' gradient (es), [b, heads, queries, keys] each. A flash kernel's blockwise
      transients are tiles, left out.
    """
    b, es, d, ll, n = lay.micro_batch, lay.attn_bytes, s.head_dim, s.seq, lay.n
    if lay.mode in ("serial", "nvidia-sp"):
        heads, kvh, queries, keys = s.heads // lay.tp, s.kv_heads // lay.tp, ll, ll
    elif lay.mode == "ulysses":
        heads, kvh, queries, keys = s.heads // n, max(1, s.kv_heads // n), ll, ll
    else:  # lss, ring: local queries against all keys
        heads, kvh, queries, keys = s.heads // lay.t, s.kv_heads // lay.t, ll // n, ll
    grads = queries * b * heads * d * es
    if lay.mode == "lss" and n > 1:
        grads += kv_transient_bytes(s, lay) or 0
    else:
        grads += keys * b * 2 * kvh * d * es
    if lay.attention_kernel != "materialized":
        return grads
    return grads + _probs(b, heads, queries, keys, es) + b * heads * queries * keys * es


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
    if lay.mode != "nvidia-sp" and group > 1:
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
