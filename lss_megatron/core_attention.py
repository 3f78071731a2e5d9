"""`LSSCoreAttention`: the LSS operator as Megatron-Core's `core_attention` module.

It plugs into the `core_attention` field of `SelfAttentionSubmodules` (see spec.py) and is built
and called by Megatron's `SelfAttention` like its own `DotProductAttention`:

    core_attention(query [s/N, b, h, d], key [s/N, b, h_kv, d], value [s/N, b, h_kv, d],
                   attention_mask, attn_mask_type=..., attention_bias=None,
                   packed_seq_params=None) -> [s/N, b, h*d]

RoPE has already been applied to query and key with global positions (positions.py). The
sequence group is Megatron's context-parallel group (`pg_collection.cp`). The constructor, the
checks and the FLOP counter are `local_attention.CoreAttentionBase`'s; the spec's ``kernel``
parameter picks flash or dense attention over the local queries x all keys.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.enums import AttnMaskType

from .local_attention import CoreAttentionBase
from .operator import attended_pairs, lss_attention


class LSSCoreAttention(CoreAttentionBase):
    """Exact LSS partial attention over the context-parallel (sequence) group, with the run's
    attention kernel (``kernel``: flash or dense, `local_attention`)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, **kwargs)
        self.layout = "contiguous"  # set by the LSS mode after the model is built (modes.py)
        self.kv_chunks = 1  # likewise

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        self.check_inputs(attention_mask, attention_bias, packed_seq_params)
        causal = self.is_causal(attn_mask_type)
        out = lss_attention(
            query,
            key,
            value,
            self.seq_group,
            causal=causal,
            softmax_scale=self.softmax_scale,
            backend="dense" if self.kernel == "dense" else "auto",
            layout=self.layout,
            kv_chunks=self.kv_chunks,
        )  # [s/N, b, h, d]
        sq, b, h, d = out.shape
        n = self.seq_group.size()
        pairs = attended_pairs(n * sq, self.seq_group.rank(), n, causal, self.layout)
        self.count_flops(4 * b * h * d * pairs)
        return out.reshape(sq, b, h * d)  # [s/N, b, h*d]
