"""Ring attention (context parallelism's p2p algorithm): the ring mode's torch part
(`ring_attention`, and `RingCoreAttention`, Megatron's core attention running it; the mode
itself is `baselines/ring.py`).

Megatron-Core's context parallelism (``cp_comm_type="p2p"``, its default), ring-flash-attention
and PyTorch's ``context_parallel`` all run this algorithm; Megatron's needs TransformerEngine's
attention (GPU only) and PyTorch's has no CPU kernel, so on CPU it is this module, on the same
attention blocks LSS uses (`lss.kernel.block_forward` / `block_backward` for flash,
`lss.dense_attention.dense_block_forward` / `dense_block_backward` for dense) and the same
log-sum-exp merge (`lss.kernel.lse_merge`), so the comparison is like for like.

Rank r of the sequence group (N ranks) holds its segment of q, k, v: contiguous (segment r) or
zigzag (chunks r and 2N-1-r of 2N), the layout LSS uses (`layout.segment_chunks`).

Forward, N steps: at step t the rank holds the [K | V] block of rank src = r - t (mod N). At the
start of each step but the last it launches the async shift of that block to rank r+1 and the
receive of the next one from rank r-1 (`comm.start_ring_shift`, category ``sp``, tag 0), then
attends the block in hand with the kernel and merges in fp32 (fp64 for fp64 inputs) through the
log-sum-exp, then waits. Causal: only (query chunk, key chunk) pairs with key chunk < query
chunk (full blocks) or equal (square diagonal blocks) are attended; fully masked blocks are
skipped (their K/V still pass on). Only the h_kv key/value heads travel (GQA).

Backward, the ring in reverse (as TransformerEngine's p2p context parallelism): the rank starts
from block r+1, the last one forward held (saved for backward), and at step t holds block
r+1+t: it launches the shift of that block to rank r-1 (tag 0), adds its contribution to the
block's gradient to the [dK | dV] accumulator that came with the block from rank r+1 (zero at
step 0), and sends the accumulator on to rank r-1 with the block (tag 1). A block's accumulator
visits all N ranks in N-1 hops and its last holder is the block's owner: at step N-1 the rank
holds its own block with the gradient summed over every rank. Blocks' backward uses the merged
output and lse (exact). dQ and the accumulators sum in fp32 on each rank.

Per layer and micro-batch a rank sends (es = element size of the compute dtype), each message
one local [K | V] block of ``2 * (l/N) * b * h_kv * d * es`` bytes: forward N-1 (K/V), backward
N-1 (K/V) plus N-1 ([dK | dV], in the compute dtype, as LSS's reduce-scatter): 3 (N-1) blocks.

Packed documents (``doc_start`` [b, l], Megatron-LM's ``--reset-attention-mask``): the global
document starts are on every rank (from its batch), so nothing about documents travels; each
step's kernel calls are the document tiles of `document_step_tasks` (per batch row and document,
the keys of the block in hand that document's queries see), and a block no local query of a row
sees is skipped. Every block still travels (the next rank may need it). The forward FLOPs counted
(`count_flops`) are then the pairs within documents, as LSS's.

Saved for backward: q [l/N, b, h, d], one [K | V] block [l/N, b, 2 h_kv, d] (block r+1), the
output [l/N, b, h, d] and the lse [b, h, l/N] (fp32): nothing of length l, unlike LSS's gathered
K/V.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from lss_megatron.layout import LAYOUTS, attended_pairs
from lss_megatron.lss.core_attention import SequenceCoreAttention
from lss_megatron.lss.dense_attention import dense_block_backward, dense_block_forward
from lss_megatron.lss.documents import document_pairs
from lss_megatron.lss.kernel import (
    block_backward,
    block_forward,
    flash_eligible,
    lse_merge,
    to_compute_dtype,
)
from lss_megatron.lss.positions import local_positions
from lss_megatron.parallel import comm

KERNELS = ("flash", "dense")
_KV_TAG, _DKV_TAG = 0, 1  # the K/V shift and the [dK | dV] shift of one backward step


# --- which blocks a step attends ----------------------------------------------------------------
def chunk_ids(rank: int, n: int, layout: str) -> tuple[int, ...]:
    """The global chunks rank `rank` holds, in local order: contiguous: (rank,) of N chunks;
    zigzag: (rank, 2N-1-rank) of 2N chunks."""
    return (rank,) if layout == "contiguous" else (rank, 2 * n - 1 - rank)


def _runs(idx: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted indices as half-open ranges: [0, 1, 3] -> [(0, 2), (3, 4)]."""
    runs: list[tuple[int, int]] = []
    for i in idx:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def step_tasks(
    q_chunks: tuple[int, ...], k_chunks: tuple[int, ...], c: int, causal: bool
) -> list[tuple[slice, slice, bool]]:
    """The kernel calls of one step: (query rows, key rows, square-causal) over the local queries
    (chunks `q_chunks` of `c` rows each) and the block in hand (chunks `k_chunks`). Non-causal:
    one call over everything. Causal: each diagonal pair (same chunk) as a causal call; key
    chunks before a query chunk as mask-free calls, grouped so that query chunks seeing the same
    key chunks, and key chunks seen by the same query chunks, share one call where they are
    adjacent in memory; key chunks after a query chunk are skipped."""
    if not causal:
        return [(slice(0, len(q_chunks) * c), slice(0, len(k_chunks) * c), False)]
    tasks = [
        (slice(i * c, (i + 1) * c), slice(j * c, (j + 1) * c), True)
        for i, qc in enumerate(q_chunks)
        for j, kc in enumerate(k_chunks)
        if qc == kc
    ]
    seen_by: dict[tuple[int, ...], list[int]] = {}  # query chunks -> the key chunks they all see
    for j, kc in enumerate(k_chunks):
        rows = tuple(i for i, qc in enumerate(q_chunks) if qc > kc)
        if rows:
            seen_by.setdefault(rows, []).append(j)
    for rows, keys in seen_by.items():
        for qa, qb in _runs(list(rows)):
            for ka, kb in _runs(keys):
                tasks.append((slice(qa * c, qb * c), slice(ka * c, kb * c), False))
    return tasks


def document_step_tasks(
    q_chunks: tuple[int, ...], k_chunks: tuple[int, ...], c: int, doc_start
) -> list[tuple[slice, slice, slice, bool]]:
    """The kernel calls of one step under document masks (Megatron-LM's
    ``--reset-attention-mask``): (batch rows, query rows, key rows, square-causal). `doc_start`
    [b, l] (CPU long) is the global start of the document of every global position, the same on
    every rank, so each rank knows which keys of the block in hand its queries see without any
    message. Per batch row, each local query chunk is cut into tiles, one per document it meets;
    tile [qa, qe) of a document starting at s sees, of key chunk kc, the keys [max(s, kc c),
    (kc+1) c) when kc < the query chunk (one mask-free call), and of its own chunk the keys
    [max(s, qa'), qa) mask-free plus the square diagonal [qa, qe) (qa' the chunk start). Keys of
    other documents are never touched: a block no local query of a row can see gives no call
    (skipped), so the work is the attended pairs ``sum_p (p - doc_start[p] + 1)``
    (`lss.documents.document_pairs`), as LSS's document tiles."""
    tasks = []
    for r in range(doc_start.shape[0]):
        rows_b = slice(r, r + 1)
        for i, qc in enumerate(q_chunks):
            starts = doc_start[r, qc * c : (qc + 1) * c]  # [c]: this chunk's document starts
            cuts = ((starts[1:] != starts[:-1]).nonzero().flatten() + 1).tolist()
            for a, e in zip([0, *cuts], [*cuts, c], strict=True):
                s = int(starts[a])  # the tile's document start (global)
                rows = slice(i * c + a, i * c + e)
                for j, kc in enumerate(k_chunks):
                    lo = max(s, kc * c) - kc * c  # first visible key, local to key chunk j
                    if kc < qc and lo < c:
                        tasks.append((rows_b, rows, slice(j * c + lo, (j + 1) * c), False))
                    elif kc == qc:
                        if lo < a:
                            tasks.append((rows_b, rows, slice(j * c + lo, j * c + a), False))
                        tasks.append((rows_b, rows, slice(j * c + a, j * c + e), True))
    return tasks


def _tasks(q_chunks, k_chunks, c: int, causal: bool, doc_start):
    """(batch rows, query rows, key rows, square-causal) of one step: every row at once without
    documents (`step_tasks`), per row and document with them (`document_step_tasks`)."""
    if doc_start is None:
        return [(slice(None), *t) for t in step_tasks(q_chunks, k_chunks, c, causal)]
    return document_step_tasks(q_chunks, k_chunks, c, doc_start)


def _block_kernels(kernel: str, q: torch.Tensor, k: torch.Tensor):
    """(forward, backward) block functions: the CPU flash ops where they run, else the dense
    block (also flash's stand-in off the CPU, where torch has no lse-returning public kernel)."""
    if kernel == "flash" and flash_eligible(q, k):
        return block_forward, block_backward
    return dense_block_forward, dense_block_backward


# --- the autograd function ----------------------------------------------------------------------
def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 2, 0, 3)  # [s, b, h, d] -> [b, h, s, d] (a view)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q, k, v, group, causal: bool, scale: float, kernel: str, layout: str, doc_start
    ):
        n, r = comm.group_size(group), comm.group_rank(group)
        sq, b, h, d = q.shape
        h_kv = k.shape[2]
        c = sq // len(chunk_ids(r, n, layout))  # rows per chunk
        fwd, _ = _block_kernels(kernel, q, k)
        acc = torch.promote_types(q.dtype, torch.float32)
        qb = _bhsd(q)  # [b, h, sq, d]
        out = torch.zeros(b, h, sq, d, dtype=acc, device=q.device)  # merged so far
        lse = torch.full((b, h, sq), -math.inf, dtype=acc, device=q.device)
        kv = torch.cat([k, v], dim=2)  # [sq, b, 2*h_kv, d]: the block that travels
        for t in range(n):
            shift = (
                comm.start_ring_shift(kv, group, category="sp", tag=_KV_TAG) if t < n - 1 else None
            )
            src = (r - t) % n
            for bs, rows, keys, diag in _tasks(
                chunk_ids(r, n, layout), chunk_ids(src, n, layout), c, causal, doc_start
            ):
                kb, vb = _bhsd(kv[keys, bs, :h_kv]), _bhsd(kv[keys, bs, h_kv:])  # [b', h_kv, k, d]
                o, l_blk = fwd(qb[bs, :, rows], kb, vb, diag, scale)
                out[bs, :, rows], lse[bs, :, rows] = lse_merge(
                    [(out[bs, :, rows], lse[bs, :, rows]), (o, l_blk)]
                )
            if shift is not None:
                kv = shift.wait()  # [sq, b, 2*h_kv, d] of rank r - t - 1
        out = out.permute(2, 0, 1, 3).to(q.dtype).contiguous()  # [sq, b, h, d]
        ctx.save_for_backward(q, kv, out, lse)  # kv: block r+1 (its own for N = 1)
        ctx.group, ctx.causal, ctx.scale = group, causal, scale
        ctx.kernel, ctx.layout, ctx.doc_start = kernel, layout, doc_start
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, kv, out, lse = ctx.saved_tensors  # kv: block r+1, the last one forward held
        group, layout = ctx.group, ctx.layout
        n, r = comm.group_size(group), comm.group_rank(group)
        sq, h_kv = q.shape[0], kv.shape[2] // 2
        c = sq // len(chunk_ids(r, n, layout))
        _, bwd = _block_kernels(ctx.kernel, q, kv)
        acc = lse.dtype
        qb, ob, dob = _bhsd(q), _bhsd(out), _bhsd(dout.to(q.dtype))  # [b, h, sq, d]
        dq = torch.zeros(qb.shape, dtype=acc, device=q.device)  # [b, h, sq, d]
        dkv_shift = None  # the [dK | dV] accumulator in flight
        for t in range(n):
            blk = (r + 1 + t) % n  # the ring in reverse: blocks r+1, r+2, ..., r
            shift = None
            if t < n - 1:
                shift = comm.start_ring_shift(kv, group, category="sp", tag=_KV_TAG, reverse=True)
            if t == 0:
                dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)  # block r+1's, from zero
            else:
                dkv = dkv_shift.wait().to(acc)  # block blk's, summed over ranks blk-1..r+1
            tasks = _tasks(
                chunk_ids(r, n, layout), chunk_ids(blk, n, layout), c, ctx.causal, ctx.doc_start
            )
            for bs, rows, keys, diag in tasks:
                kb, vb = _bhsd(kv[keys, bs, :h_kv]), _bhsd(kv[keys, bs, h_kv:])  # [b', h_kv, k, d]
                dq_b, dk_b, dv_b = bwd(
                    dob[bs, :, rows],
                    qb[bs, :, rows],
                    kb,
                    vb,
                    ob[bs, :, rows],
                    lse[bs, :, rows],
                    diag,
                    ctx.scale,
                )
                dq[bs, :, rows] += dq_b
                dkv[keys, bs, :h_kv] += dk_b.permute(2, 0, 1, 3)  # [k, b', h_kv, d]
                dkv[keys, bs, h_kv:] += dv_b.permute(2, 0, 1, 3)
            if shift is not None:  # the accumulator follows its block to rank r-1
                dkv_shift = comm.start_ring_shift(
                    dkv.to(kv.dtype), group, category="sp", tag=_DKV_TAG, reverse=True
                )
                kv = shift.wait()
        # the last block was this rank's own: dkv [sq, b, 2*h_kv, d], summed over all ranks
        dq = dq.permute(2, 0, 1, 3).to(q.dtype)  # [sq, b, h, d]
        dkv = dkv.to(kv.dtype)
        return dq, dkv[:, :, :h_kv], dkv[:, :, h_kv:], None, None, None, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group=None,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    kernel: str = "flash",
    layout: str = "contiguous",
    params_dtype: torch.dtype | None = None,
    doc_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ring attention over a sequence-parallel group (module doc).

    Args:
        q: local queries ``[s/N, b, h, d]`` (sbhd, as in Megatron), at the global positions of
            this rank's chunks (`layout`).
        k, v: local keys and values ``[s/N, b, h_kv, d]``, ``h % h_kv == 0`` (GQA/MQA).
        group: the sequence-parallel process group (default: the whole world).
        causal: mask by global position; False attends to every key.
        softmax_scale: defaults to ``1/sqrt(d)``.
        kernel: ``flash`` (the CPU flash blocks of `lss.kernel`) or ``dense`` (scores
            materialised per block).
        layout: ``contiguous`` or ``zigzag`` (`layout.LAYOUTS`), as the data was cut.
        params_dtype: as `lss.operator.lss_attention`: q, k, v are cast to the compute dtype
            before anything travels.
        doc_start: packed documents (Megatron-LM's ``--reset-attention-mask``): LongTensor
            ``[b, l]``, the global start of the document of every GLOBAL position, the same on
            every rank (nothing about documents travels); queries attend only inside their
            document and blocks no local query sees are skipped (`document_step_tasks`). Needs
            ``causal``.

    Returns:
        ``[s/N, b, h, d]`` in the compute dtype.
    """
    _check_inputs(q, k, v, kernel, layout)
    q, k, v = to_compute_dtype(q, k, v, params_dtype)  # before the ring: K/V travel in it
    group = group if group is not None else dist.group.WORLD
    if doc_start is not None:
        doc_start = _check_documents(doc_start, q, comm.group_size(group), causal)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[3])
    with torch.autocast(q.device.type, enabled=False):  # the blocks run in exactly that dtype
        return _RingAttention.apply(q, k, v, group, causal, scale, kernel, layout, doc_start)


def _check_inputs(q, k, v, kernel: str, layout: str) -> None:
    """Raise ValueError naming the shapes or options `ring_attention` cannot take."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"ring_attention expects sbhd tensors: q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    sq, b, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != sq or k.shape[1] != b or k.shape[3] != d:
        raise ValueError(
            f"ring_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must both be "
            f"[s/N={sq}, b={b}, h_kv, d={d}] to match q {tuple(q.shape)}"
        )
    if h % k.shape[2]:
        raise ValueError(f"ring_attention: heads h={h} not divisible by kv heads {k.shape[2]}")
    if kernel not in KERNELS:
        raise ValueError(f"ring_attention: unknown kernel {kernel!r}; expected one of {KERNELS}")
    if layout not in LAYOUTS:
        raise ValueError(f"ring_attention: unknown layout {layout!r}; expected one of {LAYOUTS}")
    if layout == "zigzag" and sq % 2:
        raise ValueError(f"ring_attention: zigzag needs an even local length, got {sq}")


def _check_documents(doc_start: torch.Tensor, q: torch.Tensor, n: int, causal: bool):
    """`doc_start` on the CPU, after checking it is [b, l] long for causal attention."""
    sq, b = q.shape[0], q.shape[1]
    if not causal:
        raise ValueError("ring_attention: document masks (doc_start) need causal attention")
    if doc_start.dtype != torch.long or tuple(doc_start.shape) != (b, n * sq):
        raise ValueError(
            f"ring_attention: doc_start {doc_start.dtype} {tuple(doc_start.shape)} must be int64 "
            f"[b={b}, l={n * sq}] (the document start of every global position)"
        )
    return doc_start.cpu()


class RingCoreAttention(SequenceCoreAttention):
    """Ring attention over the context-parallel (sequence) group, as Megatron's `core_attention`:
    (q [l/N, b, h, d], k/v [l/N, b, h_kv, d], mask None) -> [l/N, b, h*d]. `layout` is a spec
    parameter (`ring.get_ring_layer_spec(layout=...)`), checked by `ring.prepare_ring_model`.
    Document masks (``--reset-attention-mask``): the document starts [b, l] as Megatron's
    ``attention_mask`` (`SequenceCoreAttention`)."""

    supports_documents = True

    def __init__(self, config, layer_number: int, attn_mask_type, *, layout="contiguous", **kw):
        super().__init__(config, layer_number, attn_mask_type, **kw)
        if layout not in LAYOUTS:
            raise ValueError(f"RingCoreAttention: layout {layout!r} is not one of {LAYOUTS}")
        self.layout = layout
        self.prepared = False
        """Set by `ring.prepare_ring_model`; a group of N > 1 refuses to run without it
        (positions would be the whole table's, or RoPE's local ones: silently wrong)."""

    def attend(self, query, key, value, causal: bool, doc_start=None) -> torch.Tensor:
        if not self.prepared and self.seq_group.size() > 1:
            raise RuntimeError(
                "RingCoreAttention: this model was not prepared for the ring: call "
                "prepare_ring_model(model) once after building it, on every rank of the "
                "context-parallel group (it makes positions sequence-distributed)"
            )
        out = ring_attention(
            query,
            key,
            value,
            self.seq_group,
            causal=causal,
            softmax_scale=self.softmax_scale,
            kernel=self.kernel,
            layout=self.layout,
            doc_start=doc_start,
        )  # [s/N, b, h, d], in the compute dtype
        sq, b, h, d = out.shape
        n = self.seq_group.size()
        full = b * attended_pairs(n * sq, self.seq_group.rank(), n, causal, self.layout)
        pairs = full
        if doc_start is not None:  # pairs within documents, summed over the b rows
            held = local_positions(n * sq, self.seq_group.rank(), n, self.layout)  # [s/N]
            pairs = document_pairs(doc_start, held)
        self.count_flops(4 * h * d * pairs, 4 * h * d * full)
        return out
