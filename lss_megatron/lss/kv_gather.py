"""How K and V travel in LSS: the paper's fused communication (ONE all-gather of [K | V] forward,
ONE reduce-scatter of [dK | dV] backward), or Megatron's all_gather CP (K and V in separate
calls); and, with ``save_kv="local"``, K/V kept local and re-gathered in backward (`keep_local`).

The collectives themselves are `parallel.comm`'s, counted as ``sp``.

Fused: the local K and V segments of every rank of the sequence group are concatenated along the
heads and gathered in one collective; the adjoint of that gather is one reduce-scatter (sum) of the
concatenated gradients, so each rank receives every rank's contribution to its own K and V.
Separate (``fused=False``, Megatron-Core's ``cp_comm_type="all_gather"``): K and V are gathered in
two calls and their gradients reduce-scattered in two: the same bytes, twice the calls.

Zigzag (``zigzag_n``): the gathered buffer arrives in rank order (rank s holds chunks s and 2N-1-s);
`KVTransport.finish` reorders it into global order (one copy, which is what attention then reads
and saves) and the backward puts the gradients back into rank order before the reduce-scatter.

The gather is a start/finish pair so a caller can attend chunk c while chunk c+1 travels
(`start_kv_all_gather`, `finish_kv_all_gather`); `fused_kv_all_gather` calls the two back to back.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch

from ..layout import zigzag_gather_order
from ..parallel import comm


@functools.cache
def zigzag_permutation(n: int, device: torch.device) -> torch.Tensor:
    """`zigzag_gather_order(n)` as an index tensor on `device`, built once per (n, device): a
    ``torch.tensor(..., device=cuda)`` per forward would be a blocking host-to-device copy in
    every layer. Read-only (index_select never writes it)."""
    return torch.tensor(zigzag_gather_order(n), device=device)  # [2N]


class KVTransport:
    """One rank's view of how K/V are gathered over `group`: fused or separate calls, and, under
    the zigzag layout of `zigzag_n` ranks, the chunk permutation into global order."""

    def __init__(self, group, *, fused: bool = True, zigzag_n: int | None = None):
        self.group, self.fused, self.zigzag_n = group, fused, zigzag_n

    def start(self, k: torch.Tensor, v: torch.Tensor) -> PendingKVGather:
        """Launch the gather(s) of local k, v [s/N, b, h_kv, d] asynchronously."""
        return PendingKVGather(torch.cat([k.detach(), v.detach()], dim=2), self)

    def start_local(self, kv: torch.Tensor) -> PendingKVGather:
        """Launch the gather(s) of an already concatenated local [k | v] [s/N, b, 2*h_kv, d]."""
        return PendingKVGather(kv, self)

    def finish(self, pending: PendingKVGather) -> tuple[torch.Tensor, torch.Tensor]:
        """Wait for `pending`; K, V [s, b, h_kv, d] in global order (no autograd)."""
        for work in pending.works:
            if work is not None:
                work.wait()
        h_kv = pending.h_kv
        if self.fused:
            kv = self._to_global(pending.outs[0])  # [s, b, 2*h_kv, d]
            return kv[:, :, :h_kv], kv[:, :, h_kv:]  # 2 x [s, b, h_kv, d], views of one buffer
        return self._to_global(pending.outs[0]), self._to_global(pending.outs[1])

    def gather(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gather(s) of a local [k | v] [s/N, b, 2*h_kv, d], finished (no autograd)."""
        return self.finish(self.start_local(kv))

    def reduce_scatter(self, dk_full: torch.Tensor, dv_full: torch.Tensor):
        """dK, dV [s, b, h_kv, d] in global order -> this rank's dk, dv [s/N, b, h_kv, d]: the
        sum over the group of every rank's contribution to this rank's keys and values."""
        return self.finish_reduce_scatter(self.start_reduce_scatter(dk_full, dv_full))

    def start_reduce_scatter(self, dk_full: torch.Tensor, dv_full: torch.Tensor):
        """Launch `reduce_scatter` asynchronously (finish it with `finish_reduce_scatter`)."""
        h_kv = dk_full.shape[2]
        if self.fused:
            dkv_full = self._to_ranks(torch.cat([dk_full, dv_full], dim=2))  # [s, b, 2*h_kv, d]
            parts = [comm.start_reduce_scatter_dim0(dkv_full, self.group, category="sp")]
        else:
            parts = [
                comm.start_reduce_scatter_dim0(self._to_ranks(g), self.group, category="sp")
                for g in (dk_full, dv_full)
            ]
        return h_kv, parts

    def finish_reduce_scatter(self, pending) -> tuple[torch.Tensor, torch.Tensor]:
        """Wait for a `start_reduce_scatter`: dk, dv [s/N, b, h_kv, d]."""
        h_kv, parts = pending
        for _, work in parts:
            if work is not None:
                work.wait()
        if self.fused:
            dkv = parts[0][0]  # [s/N, b, 2*h_kv, d]
            return dkv[:, :, :h_kv], dkv[:, :, h_kv:]  # 2 x [s/N, b, h_kv, d]
        return parts[0][0], parts[1][0]  # 2 x [s/N, b, h_kv, d]

    def _to_global(self, buf: torch.Tensor) -> torch.Tensor:
        """[s, ...] in rank order -> global order (a copy under zigzag)."""
        if self.zigzag_n is None:
            return buf
        perm = zigzag_permutation(self.zigzag_n, buf.device)  # [2N]: slot of chunk j
        chunks = buf.view(2 * self.zigzag_n, -1, *buf.shape[1:])  # [2N, c, ...]
        return chunks.index_select(0, perm).flatten(0, 1)  # [s, ...]

    def _to_ranks(self, glob: torch.Tensor) -> torch.Tensor:
        """Inverse of `_to_global`: [s, ...] in global order -> rank order."""
        if self.zigzag_n is None:
            return glob
        perm = zigzag_permutation(self.zigzag_n, glob.device)  # [2N]
        chunks = glob.reshape(2 * self.zigzag_n, -1, *glob.shape[1:])  # [2N, c, ...]
        return torch.empty_like(chunks).index_copy_(0, perm, chunks).flatten(0, 1)  # [s, ...]


class PendingKVGather:
    """The all-gather(s) of one local [K | V] (or K and V) in flight, finished by
    `KVTransport.finish`."""

    def __init__(self, kv: torch.Tensor, transport: KVTransport):
        self.transport, self.h_kv = transport, kv.shape[2] // 2
        self.local = kv
        """This rank's [k | v] [s/N, b, 2*h_kv, d] (what `keep_local` keeps)."""
        group = transport.group
        if transport.fused:
            parts = [comm.start_all_gather_dim0(kv, group, category="sp")]  # [s, b, 2*h_kv, d]
        else:
            parts = [
                comm.start_all_gather_dim0(t, group, category="sp")
                for t in (kv[:, :, : self.h_kv], kv[:, :, self.h_kv :])
            ]  # 2 x [s, b, h_kv, d]
        self.outs = [out for out, _ in parts]  # valid once the works are done
        self.works = [work for _, work in parts]


class _FinishKVGather(torch.autograd.Function):
    """Forward: wait for the gather(s), K and V in global order. Backward: the reduce-scatter(s)
    of [dK | dV] (one fused, or one each)."""

    @staticmethod
    def forward(ctx, k: torch.Tensor, v: torch.Tensor, pending: PendingKVGather):
        if k.shape != v.shape or pending.local.shape[2] != 2 * k.shape[2]:
            raise ValueError(f"kv gather: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
        ctx.transport = pending.transport
        return pending.transport.finish(pending)  # 2 x [s, b, h_kv, d]

    @staticmethod
    def backward(ctx, dk_full: torch.Tensor | None, dv_full: torch.Tensor | None):
        if dk_full is None:
            dk_full = torch.zeros_like(dv_full)
        if dv_full is None:
            dv_full = torch.zeros_like(dk_full)
        dk, dv = ctx.transport.reduce_scatter(dk_full, dv_full)  # 2 x [s/N, b, h_kv, d]
        return dk, dv, None


def start_kv_all_gather(
    k: torch.Tensor, v: torch.Tensor, group, transport: KVTransport | None = None
) -> PendingKVGather:
    """Launch the gather of local k, v [s/N, b, h_kv, d] asynchronously (the fused [K | V]
    all-gather unless `transport` says otherwise)."""
    return (transport or KVTransport(group)).start(k, v)


def finish_kv_all_gather(k: torch.Tensor, v: torch.Tensor, pending: PendingKVGather):
    """Wait for `pending` (started from these k, v) and return the gathered K, V
    [s, b, h_kv, d]; autograd-connected to k and v: its backward is the reduce-scatter(s)."""
    return _FinishKVGather.apply(k, v, pending)


def fused_kv_all_gather(
    k: torch.Tensor, v: torch.Tensor, group
) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v: [s/N, b, h_kv, d] -> k_full, v_full: [s, b, h_kv, d] (views of one gathered
    buffer); backward: one reduce-scatter of [dK | dV]."""
    return finish_kv_all_gather(k, v, start_kv_all_gather(k, v, group))


# --- save_kv="local": K/V kept local, re-gathered in backward --------------------------------------
SAVE_KV = ("gathered", "local")
"""What autograd keeps of K/V for backward: ``gathered`` (the paper: the full gathered K/V of
every layer) or ``local`` (this rank's segment only; backward re-gathers, Megatron's all_gather
CP and Llama 3's choice: one more gather per layer)."""


class _Regather:
    """Stands for the gathered K/V of one gather among autograd's saved tensors and re-gathers
    them once, on the first unpack in backward (the buffers are dropped after the last).

    What it keeps (through the enclosing saved-tensor hooks, so a byte counter sees it): the
    local k, v themselves when they are views of the buffer q lives in (Megatron's fused QKV
    projection output, MHA without RoPE: the kernel keeps that buffer for q anyway, so they cost
    nothing more); otherwise the [k | v] buffer the gather sent, [s/N, b, 2*h_kv, d], its own
    storage, so it keeps no larger buffer alive."""

    def __init__(self, pending: PendingKVGather, outer, views=None):
        self.transport, self.outer = pending.transport, outer
        kept = list(views) if views is not None else [pending.local]
        self.kept = [outer[0](t) if outer else t for t in kept]
        self.packs = 0
        self.full: tuple[torch.Tensor, torch.Tensor] | None = None

    def unpack(self, which: int, offset: int, size, stride) -> torch.Tensor:
        if self.full is None:
            kept = [self.outer[1](t) if self.outer else t for t in self.kept]
            kv = kept[0] if len(kept) == 1 else torch.cat(kept, dim=2)  # [s/N, b, 2*h_kv, d]
            self.full = self.transport.gather(kv)  # 2 x [s, b, h_kv, d], as in forward
        t = self.full[which].as_strided(size, stride, offset)
        self.packs -= 1
        if self.packs <= 0:
            self.full = None
        return t


class _LocalKV:
    """The saved-tensor hooks of `keep_local`: storages of gathered K/V -> their `_Regather`."""

    def __init__(self):
        self.watched: dict[int, tuple[weakref.ref, _Regather, int]] = {}
        top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
        self.outer = top(False) if top is not None else None  # e.g. the saved-bytes counter

    def add(self, k_full, v_full, pending: PendingKVGather, k=None, v=None, q=None) -> None:
        """Gathered K, V (from `pending`, sent from local `k`, `v`) are saved as the local k, v
        if they share q's buffer, else as `pending`'s [k | v]; re-gathered in backward."""
        shared = q is not None and k is not None and v is not None
        shared = shared and all(_same_storage(t, q) for t in (k, v))
        regather = _Regather(pending, self.outer, (k.detach(), v.detach()) if shared else None)
        for which, t in enumerate((k_full, v_full)):
            st = t.untyped_storage()
            self.watched[st.data_ptr()] = (weakref.ref(t), regather, which)

    def pack(self, t: torch.Tensor):
        hit = self.watched.get(t.untyped_storage().data_ptr()) if t.numel() else None
        if hit is not None and hit[0]() is not None and t.dtype == hit[0]().dtype:
            _, regather, which = hit
            regather.packs += 1
            return (regather, which, t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        return (None, self.outer[0](t)) if self.outer else (None, t)

    def unpack(self, packed) -> torch.Tensor:
        if packed[0] is None:
            return self.outer[1](packed[1]) if self.outer else packed[1]
        regather, which, offset, size, stride = packed
        return regather.unpack(which, offset, size, stride)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@contextlib.contextmanager
def keep_local(enabled: bool = True):
    """Inside the block, gathered K/V registered with ``.add(k_full, v_full, pending, k, v, q)``
    are not kept for backward: autograd keeps the local k, v and re-gathers on first use in
    backward. Any other saved tensor goes to the enclosing hooks (or is kept as it is). Yields
    None (nothing to register) when not `enabled`."""
    if not enabled:
        yield None
        return
    local = _LocalKV()
    with torch.autograd.graph.saved_tensors_hooks(local.pack, local.unpack):
        yield local
