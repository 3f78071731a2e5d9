"""`LSSCoreAttention`: the LSS operator as Megatron-Core's `core_attention` module.

It plugs into the `core_attention` field of `SelfAttentionSubmodules` (see spec.py) and is built
and called by Megatron's `SelfAttention` like its own `DotProductAttention`:

    core_attention(query [s/N, b, h, d], key [s/N, b, h_kv, d], value [s/N, b, h_kv, d],
                   attention_mask, attn_mask_type=..., attention_bias=None,
                   packed_seq_params=None) -> [s/N, b, h*d]

RoPE has already been applied to query and key with global positions (positions.py). The
sequence group is Megatron's context-parallel group (`pg_collection.cp`).
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from .operator import attended_pairs, lss_attention


class LSSCoreAttention(MegatronModule):
    """Exact LSS partial attention over the context-parallel (sequence) group."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"LSSCoreAttention: attention dropout {dropout} is not supported (use 0.0)"
            )
        if getattr(config, "apply_query_key_layer_scaling", False):
            raise ValueError("LSSCoreAttention: apply_query_key_layer_scaling is not supported")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise ValueError(
                f"LSSCoreAttention: attn_mask_type {attn_mask_type} unsupported (causal or no_mask)"
            )
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        cp = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.seq_group = cp if cp is not None else parallel_state.get_context_parallel_group()
        head_dim = config.kv_channels
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        )
        self.layout = "contiguous"  # set by the LSS mode after the model is built (modes.py)
        self.kv_chunks = 1  # likewise
        self.attention_flops = 0
        """Forward attention FLOPs (4 b h d x attended pairs) since the last reset: this rank's
        share of the attention work, read by the trainer to report the load balance."""

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
        if attention_mask is not None:
            raise NotImplementedError(
                "LSSCoreAttention masks by global position itself; pass attention_mask=None "
                f"(got a tensor of shape {tuple(attention_mask.shape)})"
            )
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError(
                "LSSCoreAttention: attention_bias and packed sequences are not supported"
            )
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        out = lss_attention(
            query,
            key,
            value,
            self.seq_group,
            causal=mask_type == AttnMaskType.causal,
            softmax_scale=self.softmax_scale,
            layout=self.layout,
            kv_chunks=self.kv_chunks,
            params_dtype=getattr(self.config, "params_dtype", None),
        )  # [s/N, b, h, d], in the compute dtype (autocast's or bf16 parameters')
        sq, b, h, d = out.shape
        n = self.seq_group.size()
        pairs = attended_pairs(n * sq, self.seq_group.rank(), n, mask_type == AttnMaskType.causal,
                               self.layout)  # fmt: skip
        self.attention_flops += 4 * b * h * d * pairs
        return out.reshape(sq, b, h * d)  # [s/N, b, h*d]
