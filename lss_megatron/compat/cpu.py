"""Megatron-Core on CPU with gloo: the few accommodations it needs, in one place.

Megatron-Core assumes CUDA in a handful of spots that have nothing to do with the maths. On a
machine without CUDA, `apply()` installs these replacements (and nothing else):

1. ``torch.cuda.current_device`` -> ``cpu``: Megatron places buffers with it
   (tensor_parallel/mappings.py, layers.py, utils.GlobalMemoryBuffer, RoPE's inv_freq).
2. The "CUDA" RNG used by Megatron's RNG tracker (tensor_parallel/random.py) is mapped onto the
   CPU generator. The tracker only forks and restores it, so the CPU stream is left as it was.
   This also makes Megatron's activation recompute (`tensor_parallel.checkpoint`, which
   ``--recompute selective|full`` uses through `TransformerConfig.recompute_granularity`) run on
   CPU: its `CheckpointFunction` saves and restores these states around the recomputation, and
   nothing else in it needs CUDA (checked: exact gradients, tests/ranks/test_like_for_like.py).
3. ``get_default_causal_mask`` (transformer/utils.py, also bound in fusions/fused_softmax.py)
   builds its mask on "cuda"; the replacement builds the same mask on the CPU.
4. ``torch.cuda.synchronize`` and the stream API are no-ops (megatron-core 0.19's DDP touches them).
5. Megatron's RoPE slicing for context parallelism (``get_pos_emb_on_this_cp_rank``, bound in
   rotary_pos_embedding.py) pins its index and moves it to CUDA; the replacement selects the same
   zig-zag rows (chunks r and 2N-1-r of 2N) on the CPU. Our modes never call it (their
   `SegmentRotaryEmbedding` replaces Megatron's slicing), but a model whose `prepare_lss_model`
   was forgotten does, and must reach `LSSCoreAttention`'s clear refusal as it would on a GPU.

The LayerNorm that nvidia-sp needs without apex is `modes/sp_norms.py`'s (nvidia-sp, and LSS x TP).

`apply()` does nothing when CUDA is available, is idempotent, and returns the names it applied.
"""

from __future__ import annotations

import contextlib
import logging

import megatron.core.fusions.fused_softmax as fused_softmax
import megatron.core.models.common.embeddings.rotary_pos_embedding as mrope
import megatron.core.tensor_parallel.random as mrandom
import megatron.core.transformer.utils as tutils
import torch

log = logging.getLogger(__name__)

_applied: list[str] = []


class _NullStream:
    def wait_event(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def synchronize(self):
        pass


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    """Megatron's default causal mask ([sq, sq], True = masked) built on the CPU."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
    """Megatron's zig-zag slice of rotary embeddings for this context-parallel rank, on the CPU:
    [l, ...] along `seq_dim` -> [l/N, ...] (chunks r and 2N-1-r of 2N)."""
    from ..layout import segment_chunks

    n, r = cp_group.size(), cp_group.rank()
    rows = [
        torch.arange(lo, hi) for lo, hi in segment_chunks(pos_emb.shape[seq_dim], r, n, "zigzag")
    ]
    return pos_emb.index_select(seq_dim, torch.cat(rows))  # [l/N, ...]


def apply() -> list[str]:
    """Install the CPU accommodations when CUDA is absent; a no-op on CUDA machines."""
    if torch.cuda.is_available():
        return []
    if _applied:
        return list(_applied)

    torch.cuda.current_device = lambda: torch.device("cpu")
    _applied.append("current_device")

    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = torch.manual_seed
    _applied.append("rng_tracker_on_cpu_generator")

    tutils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    _applied.append("causal_mask_on_cpu")

    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.default_stream = lambda *a, **k: _NullStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    _applied.append("null_streams")

    mrope.get_pos_emb_on_this_cp_rank = _cpu_pos_emb_on_this_cp_rank
    _applied.append("rope_cp_slice_on_cpu")

    log.debug("Megatron-Core CPU accommodations applied: %s", _applied)
    return list(_applied)
