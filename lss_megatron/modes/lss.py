"""lss: the LSS Transformer on Megatron's context-parallel group of N ranks: Megatron's local GPT
layer spec with `LSSCoreAttention` as its one changed field, then sequence-distributed positions
and the segment layout on every LSS core attention."""

from __future__ import annotations

from ..lss.core_attention import LSSCoreAttention
from ..lss.positions import distribute_positions
from .base import Mode
from .serial import get_serial_layer_spec


def get_lss_layer_spec(causal: bool = True):
    """Megatron's local GPT layer spec with `LSSCoreAttention` as its core attention."""
    spec = get_serial_layer_spec(causal)
    spec.submodules.self_attention.submodules.core_attention = LSSCoreAttention
    return spec


def post_build(model, grid) -> None:
    """Sequence-distributed positions, and the segment layout on every LSS core attention."""
    distribute_positions(model, grid.seq_rank, grid.seq_size, grid.layout)
    for module in model.modules():
        if isinstance(module, LSSCoreAttention):
            module.layout = grid.layout
            module.kv_chunks = grid.kv_gather_chunks


MODE = Mode(name="lss", layer_spec=lambda m: get_lss_layer_spec(m.causal), post_build=post_build)
