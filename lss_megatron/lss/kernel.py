"""Partial self-attention of LSS: local queries of one segment against the gathered full K/V.

Layout is Megatron's sbhd: ``q`` is ``[sq, b, h, d]`` (local queries, global positions
``q_offset + i``), ``k``/``v`` are ``[sk, b, h_kv, d]`` (all keys of the sequence), ``h % h_kv == 0``
and query head ``i`` uses kv head ``i // (h // h_kv)``. Causal: row ``i`` sees keys
``j <= q_offset + i`` (bottom-right aligned when ``q_offset + sq == sk``).

Backends and what autograd saves for backward (es = element size of the input dtype):

- ``cpu_flash`` (CPU default): a ``torch.autograd.Function`` over the private ops
  ``aten::_scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p=0., is_causal=False, *,
  attn_mask=None, scale=None) -> (output, logsumexp)`` and ``..._backward(grad_out, q, k, v, out,
  logsumexp, dropout_p, is_causal, *, attn_mask=None, scale=None) -> (dq, dk, dv)``, layout bhsd,
  any strides. Causal runs two key blocks, the visible prefix ``[0, q_offset)`` without a mask and
  the square diagonal ``[q_offset, q_offset + sq)`` with ``is_causal=True``; later keys are skipped.
  Blocks are merged exactly through the log-sum-exp; backward calls the backward op per block with
  the merged output and lse (exact, as flash-attention's ``D = rowsum(dO * O)``). GQA: the group
  ``g = h // h_kv`` is folded into the query length for mask-free blocks, and the short diagonal
  K/V are expanded. Saved: ``q`` [sq, b, h, d] (the input), ``k``, ``v`` [sk, b, h_kv, d] (the
  inputs, views: a fused [k|v] buffer counts once), ``out`` [sq, b, h, d] (the returned tensor)
  and ``lse`` [b, h, sq] fp32 (fp64 for fp64 inputs). Bytes: es*(2*sq*b*h*d + 2*sk*b*h_kv*d)
  + 4*b*h*sq, linear in sk.
- ``sdpa``: ``F.scaled_dot_product_attention(enable_gqa=True)``, autograd does backward. Causal
  uses ``is_causal=True`` when ``q_offset == 0`` and ``sq == sk``, ``causal_lower_right`` on CUDA
  when ``q_offset + sq == sk``, otherwise a boolean ``[sq, q_offset + sq]`` mask. The kernel decides
  what it saves; on CPU (torch 2.13) that is q, k, v, out, lse plus, with a mask, a float
  ``[sq, q_offset + sq]`` mask: quadratic, but with no b or h factor.
  On CUDA it runs under an explicit allow-list, `CUDA_KERNELS` (flash, memory-efficient, cuDNN, tried
  in that order, `sdpa_priority`):
  where none of them can run, it raises `AttentionKernelError` instead of falling back to the math
  kernel (a [b, h, sq, sk] fp32 score tensor). The fused kernels save q, k, v, out and the lse
  (linear in sk). Flash and cuDNN need 16-bit inputs and the memory-efficient kernel has no GQA,
  so fp32 GQA expands K/V to h heads (`_expand_kv_for_kernel`, logged once): g x the K/V bytes,
  still linear in sk. 16-bit GQA runs flash on the h_kv heads as they are.
- ``math``: blockwise pure-torch reference over query chunks of 256 rows, fp32 (or fp64)
  accumulation, visible keys only. Autograd saves the fp32 probabilities of every chunk,
  ``4*b*h*sq*(q_offset + sq)`` bytes (``sk`` instead if non-causal): quadratic, a fallback/oracle.
- ``auto``: ``cpu_flash`` for non-empty CPU inputs of a supported dtype when the private ops exist
  (and have not failed before), else ``sdpa``. If a private op raises, the call falls back to
  ``sdpa`` (forward) or recomputes through ``sdpa`` (backward) and logs once.

``training.metrics.count_saved_bytes(fn, *args)`` counts the unique storages autograd saves while
running ``fn``: the byte counts above are checked with it.

Compute dtype (`compute_dtype`): the kernel (and, in `operator.lss_attention`, the K/V gather)
runs in the autocast dtype when autocast is on for the inputs' device, whatever dtype the inputs
arrive in (Megatron's linear layers add their fp32 bias after the bf16 matmul, so under autocast
q, k, v arrive in fp32); else in a 16-bit parameter dtype when one is given (the sequence core
attentions pass Megatron's ``params_dtype``); else in the inputs' dtype. Inside the kernel call
autocast is off, so the kernel runs exactly in that dtype; the output is in that dtype (as an
autocast op's).
"""

from __future__ import annotations

import inspect
import logging
import math

import torch
import torch.nn.attention.bias
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu_flash", "sdpa", "math")
CUDA_KERNELS = (
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
)
"""The SDPA kernels allowed on CUDA (never the quadratic math kernel), in priority order: flash
first wherever it can run (16-bit), so square causal calls (SDPA's selector, which would put cuDNN
first on sm90) and offset calls (the lower-right mask, which dispatches to flash itself) run the
same kernel in every mode and on every rank (`sdpa_priority`)."""
_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_MATH_CHUNK = 256
_flash_failed = False  # set once a private op raised; "auto" then stops choosing cpu_flash
_expand_noted = False  # fp32 GQA on CUDA: K/V expansion logged once


def sdpa_priority():
    """`sdpa_kernel` allowing only `CUDA_KERNELS`, tried in that order (``set_priority``, torch >=
    2.6; older torch keeps its own order among them)."""
    if "set_priority" in inspect.signature(sdpa_kernel).parameters:
        return sdpa_kernel(list(CUDA_KERNELS), set_priority=True)
    return sdpa_kernel(list(CUDA_KERNELS))


class AttentionKernelError(RuntimeError):
    """No allowed (memory-efficient) SDPA kernel can run these inputs on CUDA."""


# --- compute dtype -----------------------------------------------------------------------------
def compute_dtype(x: torch.Tensor, params_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype attention runs in (module doc): autocast's, else a 16-bit `params_dtype`, else
    the input's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    if params_dtype in (torch.bfloat16, torch.float16):
        return params_dtype
    return x.dtype


def to_compute_dtype(q, k, v, params_dtype: torch.dtype | None = None):
    """q, k, v cast to `compute_dtype` (no copy where they already are)."""
    dtype = compute_dtype(q, params_dtype)
    return q.to(dtype), k.to(dtype), v.to(dtype)


# --- the one place that touches the private CPU flash ops --------------------------------------
def _flash_ops_available() -> bool:
    aten = torch.ops.aten
    return hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
        aten, "_scaled_dot_product_flash_attention_for_cpu_backward"
    )


def _flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """bhsd q [b, H, m, d], k/v [b, H, n, d] -> out [b, H, m, d], lse [b, H, m] (fp32)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, scale=scale
    )


def _flash_bwd(dout, q, k, v, out, lse, causal: bool, scale: float):
    """Returns dq [b, H, m, d], dk, dv [b, H, n, d]; ``out``/``lse`` may be merged over blocks."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale
    )


def _note_flash_failure(exc: Exception) -> None:
    global _flash_failed
    if not _flash_failed:
        logger.warning("private CPU flash-attention op failed (%s); falling back to sdpa", exc)
    _flash_failed = True


# --- cpu_flash: blockwise flash attention merged through the log-sum-exp -------------------------
def _blocks(sq: int, sk: int, q_offset: int, causal: bool) -> list[tuple[int, int, bool]]:
    """Key blocks (start, end, is_causal) that the local queries see."""
    if not causal:
        return [(0, sk, False)]
    prefix = [(0, q_offset, False)] if q_offset > 0 else []
    return prefix + [(q_offset, q_offset + sq, True)]


def block_forward(qb, kb, vb, causal: bool, scale: float):
    """One mask-free (or square causal) flash block: qb [b, h, sq, d], kb/vb [b, h_kv, n, d]
    (bhsd, any strides) -> out [b, h, sq, d] (input dtype), lse [b, h, sq] (fp32; fp64 for fp64
    inputs). Shared with the ring (`baselines/ring_attention.py`), which merges blocks with `lse_merge`."""
    b, h, sq, d = qb.shape
    h_kv = kb.shape[1]
    g = h // h_kv
    if g == 1:
        return _flash_fwd(qb, kb, vb, causal, scale)
    if causal:  # short square block: expand the local K/V to h heads
        kx, vx = kb.repeat_interleave(g, 1), vb.repeat_interleave(g, 1)  # [b, h, n, d]
        return _flash_fwd(qb, kx, vx, True, scale)
    qf = qb.reshape(b, h_kv, g * sq, d)  # [b, h_kv, g*sq, d]
    out, lse = _flash_fwd(qf, kb, vb, False, scale)
    return out.reshape(b, h, sq, d), lse.reshape(b, h, sq)  # [b, h, sq, d], [b, h, sq]


def block_backward(dout, qb, kb, vb, out, lse, causal: bool, scale: float):
    """All bhsd as in `block_forward`; `out` and `lse` are the MERGED output and log-sum-exp of
    the rows (exact, as flash-attention's ``D = rowsum(dO * O)``) -> dq [b, h, sq, d], dk/dv
    [b, h_kv, n, d]."""
    b, h, sq, d = qb.shape
    h_kv = kb.shape[1]
    g = h // h_kv
    if g == 1:
        return _flash_bwd(dout, qb, kb, vb, out, lse, causal, scale)
    if causal:
        kx, vx = kb.repeat_interleave(g, 1), vb.repeat_interleave(g, 1)  # [b, h, n, d]
        dq, dk, dv = _flash_bwd(dout, qb, kx, vx, out, lse, True, scale)
        return dq, dk.unflatten(1, (h_kv, g)).sum(2), dv.unflatten(1, (h_kv, g)).sum(2)
    fold = (b, h_kv, g * sq, d)  # group folded into the query length
    lse_f = lse.reshape(b, h_kv, g * sq)  # [b, h_kv, g*sq]
    dq, dk, dv = _flash_bwd(
        dout.reshape(fold), qb.reshape(fold), kb, vb, out.reshape(fold), lse_f, False, scale
    )
    return dq.reshape(b, h, sq, d), dk, dv  # dq [b, h, sq, d]


def lse_merge(parts):
    """Exact merge of attention blocks over disjoint keys: parts [(out [..., sq, d], lse [..., sq])]
    -> (out, lse) in the lse's dtype (fp32, or fp64): lse = log sum exp(lse_i), out = sum
    exp(lse_i - lse) out_i. A part whose lse is -inf (no key seen yet) contributes nothing, so an
    accumulator may start at (0, -inf) as long as some part is finite."""
    lse = torch.stack([p[1] for p in parts]).logsumexp(0)  # [..., sq]
    acc = lse.dtype
    out = sum(o.to(acc) * (lse_i - lse).exp().unsqueeze(-1) for o, lse_i in parts)
    return out, lse  # [..., sq, d], [..., sq]


class _CpuFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_offset: int, causal: bool, scale: float):
        qb = q.permute(1, 2, 0, 3)  # [b, h, sq, d]
        kb, vb = k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)  # [b, h_kv, sk, d]
        blocks = _blocks(q.shape[0], k.shape[0], q_offset, causal)
        parts = [block_forward(qb, kb[:, :, s:e], vb[:, :, s:e], c, scale) for s, e, c in blocks]
        out, lse = parts[0] if len(parts) == 1 else lse_merge(parts)  # [b, h, sq, d], [b, h, sq]
        out = out.permute(2, 0, 1, 3).contiguous().to(q.dtype)  # [sq, b, h, d]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.q_offset, ctx.causal, ctx.scale = q_offset, causal, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        try:
            dq, dk, dv = _cpu_flash_backward(ctx, dout, q, k, v, out, lse)
        except RuntimeError as exc:
            _note_flash_failure(exc)
            with torch.enable_grad():
                qkv = [t.detach().requires_grad_() for t in (q, k, v)]
                o = _sdpa_attention(*qkv, ctx.q_offset, ctx.causal, ctx.scale)
                dq, dk, dv = torch.autograd.grad(o, qkv, dout)
        return dq, dk, dv, None, None, None


def _cpu_flash_backward(ctx, dout, q, k, v, out, lse):
    qb, ob, dob = (t.permute(1, 2, 0, 3) for t in (q, out, dout))  # [b, h, sq, d]
    kb, vb = k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)  # [b, h_kv, sk, d]
    dq = torch.zeros(
        qb.shape, dtype=lse.dtype, device=q.device
    )  # [b, h, sq, d], accumulated over blocks
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)  # [sk, b, h_kv, d]
    dkb, dvb = dk.permute(1, 2, 0, 3), dv.permute(1, 2, 0, 3)  # [b, h_kv, sk, d]
    for s, e, causal in _blocks(q.shape[0], k.shape[0], ctx.q_offset, ctx.causal):
        args = (dob, qb, kb[:, :, s:e], vb[:, :, s:e], ob, lse, causal, ctx.scale)
        dq_blk, dk_blk, dv_blk = block_backward(*args)
        dq += dq_blk
        dkb[:, :, s:e] = dk_blk  # key blocks are disjoint
        dvb[:, :, s:e] = dv_blk
    return dq.permute(2, 0, 1, 3).to(q.dtype), dk, dv  # dq [sq, b, h, d]


# --- sdpa and math backends --------------------------------------------------------------------
def _sdpa_attention(q, k, v, q_offset: int, causal: bool, scale: float) -> torch.Tensor:
    sq, sk = q.shape[0], k.shape[0]
    mask, is_causal = None, False
    if causal:
        k, v = k[: q_offset + sq], v[: q_offset + sq]  # later keys are never visible
        sk = q_offset + sq
        if q_offset == 0:
            is_causal = True  # square and top-left aligned: no mask tensor
        elif q.is_cuda:
            mask = torch.nn.attention.bias.causal_lower_right(sq, sk)
        else:
            mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(q_offset)  # [sq, sk]
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, h or h_kv, s, d]
    if not q.is_cuda:
        out = F.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True
        )  # [b, h, sq, d]
        return out.permute(2, 0, 1, 3)  # [sq, b, h, d]
    kb, vb = _expand_kv_for_kernel(qb, kb, vb)  # [b, h or h_kv, sk, d]
    _check_cuda_kernel(qb, kb, vb, mask)
    try:
        with sdpa_priority():
            out = F.scaled_dot_product_attention(
                qb, kb, vb, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True
            )  # [b, h, sq, d]
    except RuntimeError as exc:
        if "no available kernel" not in str(exc).lower():
            raise
        raise AttentionKernelError(_kernel_message(qb, kb, str(exc))) from exc
    return out.permute(2, 0, 1, 3)  # [sq, b, h, d]


def _expand_kv_for_kernel(qb, kb, vb):
    """fp32 (or fp64) GQA on CUDA: repeat K/V heads to h (flash and cuDNN need 16-bit inputs,
    the memory-efficient kernel has no GQA). 16-bit inputs are returned as they are."""
    global _expand_noted
    h, h_kv = qb.shape[1], kb.shape[1]
    if h == h_kv or qb.dtype in (torch.bfloat16, torch.float16):
        return kb, vb
    if not _expand_noted:
        logger.info(
            "attention: %s GQA on CUDA expands K/V from %d to %d heads for the "
            "memory-efficient kernel (flash needs 16-bit inputs)",
            qb.dtype,
            h_kv,
            h,
        )
        _expand_noted = True
    g = h // h_kv
    return kb.repeat_interleave(g, 1), vb.repeat_interleave(g, 1)  # [b, h, sk, d]


def _check_cuda_kernel(qb, kb, vb, mask) -> None:
    """Raise before torch would materialise a lower-right causal mask: `CausalBias` falls back to
    an explicit [sq, sk] mask when neither flash nor the memory-efficient kernel accepts the
    inputs (its own dispatch, outside the allow-list's reach)."""
    if not isinstance(mask, torch.nn.attention.bias.CausalBias):
        return
    cuda = torch.backends.cuda
    params = cuda.SDPAParams(qb, kb, vb, None, 0.0, False, qb.shape[1] != kb.shape[1])
    with sdpa_priority():
        if cuda.can_use_flash_attention(params) or cuda.can_use_efficient_attention(params):
            return
    raise AttentionKernelError(
        _kernel_message(qb, kb, "no flash or memory-efficient kernel for a lower-right causal mask")
    )


def _kernel_message(qb, kb, why: str) -> str:
    return (
        f"attention: no allowed SDPA kernel ({', '.join(b.name for b in CUDA_KERNELS)}) for "
        f"q {tuple(qb.shape)} k {tuple(kb.shape)} {qb.dtype} on {qb.device}; refusing the "
        f"quadratic math kernel ({why.splitlines()[0] if why else ''})"
    )


def _math_attention(q, k, v, q_offset: int, causal: bool, scale: float) -> torch.Tensor:
    sq, b, h, d = q.shape
    h_kv = k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    if causal:
        k, v = k[: q_offset + sq], v[: q_offset + sq]
    sk = k.shape[0]
    kt = k.to(acc).permute(1, 2, 3, 0).unsqueeze(2)  # [b, h_kv, 1, d, sk]
    vb = v.to(acc).permute(1, 2, 0, 3).unsqueeze(2)  # [b, h_kv, 1, sk, d]
    key_pos = torch.arange(sk, device=q.device)
    outs = []
    for s in range(0, max(sq, 1), _MATH_CHUNK):
        qc = q[s : s + _MATH_CHUNK].to(acc).permute(1, 2, 0, 3)  # [b, h, c, d]
        qc = qc.unflatten(1, (h_kv, h // h_kv))  # [b, h_kv, g, c, d]
        scores = (qc @ kt) * scale  # [b, h_kv, g, c, sk]
        if causal:
            rows = torch.arange(s, s + qc.shape[3], device=q.device) + q_offset
            scores = scores.masked_fill(key_pos > rows[:, None], float("-inf"))  # mask [c, sk]
        o = scores.softmax(-1) @ vb  # [b, h_kv, g, c, d]
        outs.append(o.flatten(1, 2).permute(2, 0, 1, 3))  # [c, b, h, d]
    return torch.cat(outs).to(q.dtype)  # [sq, b, h, d]


# --- public API --------------------------------------------------------------------------------
def flash_eligible(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the CPU flash ops can run q, k (CPU, supported dtype, non-empty, ops present)."""
    return _flash_eligible(q, k) and not _flash_failed


def _flash_eligible(q: torch.Tensor, k: torch.Tensor) -> bool:
    return (
        q.device.type == "cpu"
        and q.dtype in _FLASH_DTYPES
        and q.shape[0] > 0
        and k.shape[0] > 0  # the op crashes (SIGFPE) on an empty key block
        and _flash_ops_available()
    )


def partial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_offset: int,
    causal: bool,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v; q [sq, b, h, d], k/v [sk, b, h_kv, d] -> [sq, b, h, d]."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    sq, b, h, d = q.shape
    sk, h_kv = k.shape[0], k.shape[2]
    if k.shape != v.shape or k.shape[1] != b or k.shape[3] != d or h % h_kv != 0:
        raise ValueError(f"bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if causal and not (0 <= q_offset and q_offset + sq <= sk):
        raise ValueError(f"causal needs 0 <= q_offset and q_offset + sq <= sk ({q_offset=})")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    q, k, v = to_compute_dtype(q, k, v)
    with torch.autocast(q.device.type, enabled=False):  # the kernel runs in exactly that dtype
        return _run_backend(q, k, v, q_offset, causal, scale, backend)


def _run_backend(q, k, v, q_offset: int, causal: bool, scale: float, backend: str):
    if backend == "auto":
        backend = "cpu_flash" if _flash_eligible(q, k) and not _flash_failed else "sdpa"
    if backend == "cpu_flash":
        if not _flash_eligible(q, k):
            raise ValueError("cpu_flash needs non-empty CPU tensors and the private CPU flash ops")
        try:
            return _CpuFlashAttention.apply(q, k, v, q_offset, causal, scale)
        except RuntimeError as exc:
            _note_flash_failure(exc)
            backend = "sdpa"
    if backend == "sdpa":
        return _sdpa_attention(q, k, v, q_offset, causal, scale)
    return _math_attention(q, k, v, q_offset, causal, scale)
