"""One attention kernel choice for every mode, and the core attention of serial and nvidia-sp.

``--attention-kernel`` picks the kernel family that every mode runs, so that the comparison
compares parallel schemes, not kernels:

* ``flash``: `attention.partial_attention` (CPU: the private flash op path, ``cpu_flash``; CUDA:
  SDPA, which picks flash / memory-efficient attention). Saves q, k, v, the output and the
  log-sum-exp: nothing quadratic in l.
* ``dense``: scores materialised and probabilities saved. Serial and nvidia-sp run Megatron's own
  `DotProductAttention`; LSS and Ulysses run `dense_attention.dense_attention`, the same maths
  over LSS's ``[l/N, l]`` block and Ulysses' ``[l, l]`` on h/N heads.

`CoreAttentionBase` is what every `core_attention` replacement in this project shares (LSS,
Ulysses, `FlashCoreAttention`): the constructor Megatron's `SelfAttention` calls, the checks, the
kernel it runs and the attention FLOPs of its training forwards. `FlashCoreAttention` runs the
flash kernel on the local heads over the full sequence: all h heads in serial, h/N heads of a
tensor-parallel rank in nvidia-sp (Megatron gathers the sequence before QKV). Megatron builds it
from the layer spec (`model.get_serial_layer_spec`), exactly like its `DotProductAttention`.
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import is_checkpointing
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from .attention import partial_attention
from .dense_attention import dense_attention

KERNELS = ("flash", "dense")


def attend(q, k, v, *, kernel: str, q_offset: int, causal: bool, softmax_scale: float):
    """q [sq, b, h, d], k/v [sk, b, h_kv, d] -> [sq, b, h, d] with `kernel` (see module doc)."""
    if kernel == "flash":
        return partial_attention(q, k, v, q_offset=q_offset, causal=causal,
                                 softmax_scale=softmax_scale)  # fmt: skip
    if kernel == "dense":
        return dense_attention(q, k, v, q_offset=q_offset, causal=causal,
                               softmax_scale=softmax_scale)  # fmt: skip
    raise ValueError(f"unknown attention kernel {kernel!r}; expected one of {KERNELS}")


class CoreAttentionBase(MegatronModule):
    """Megatron `core_attention` interface shared by this project's attention modules."""

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
        kernel: str = "flash",
    ):
        super().__init__(config=config)
        name = type(self).__name__
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"{name}: attention dropout {dropout} is not supported (use 0.0)")
        if getattr(config, "apply_query_key_layer_scaling", False):
            raise ValueError(f"{name}: apply_query_key_layer_scaling is not supported")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise ValueError(f"{name}: attn_mask_type {attn_mask_type} unsupported (causal or "
                             "no_mask)")  # fmt: skip
        if kernel not in KERNELS:
            raise ValueError(f"{name}: unknown attention kernel {kernel!r}; expected {KERNELS}")
        self.kernel = kernel
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        cp = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.seq_group = cp if cp is not None else parallel_state.get_context_parallel_group()
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        )
        self.attention_flops = 0
        """Forward attention FLOPs (4 b h d x attended pairs) of the training forwards since the
        last reset (`count_flops`): this rank's share of the attention work."""

    def check_inputs(self, attention_mask, attention_bias, packed_seq_params) -> None:
        if attention_mask is not None:
            raise NotImplementedError(
                f"{type(self).__name__} masks by global position itself; pass attention_mask="
                f"None (got a tensor of shape {tuple(attention_mask.shape)})"
            )
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError(
                f"{type(self).__name__}: attention_bias and packed sequences are not supported"
            )

    def is_causal(self, attn_mask_type: AttnMaskType | None) -> bool:
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        return mask_type == AttnMaskType.causal

    def count_flops(self, flops: int) -> None:
        """Add one forward's attention FLOPs, except in evaluation (not training) and in
        Megatron's recompute during backward (checkpointing with grad enabled): each training
        step counts each layer's forward once."""
        if not self.training or (is_checkpointing() and torch.is_grad_enabled()):
            return
        self.attention_flops += flops


class FlashCoreAttention(CoreAttentionBase):
    """The flash kernel on this rank's heads over the whole sequence (serial, nvidia-sp):
    (q [l, b, hp, d], k/v [l, b, hp_kv, d], mask None) -> [l, b, hp*d]."""

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
        out = attend(query, key, value, kernel="flash", q_offset=0,
                     causal=self.is_causal(attn_mask_type),
                     softmax_scale=self.softmax_scale)  # [l, b, hp, d]  # fmt: skip
        sq, b, h, d = out.shape
        return out.reshape(sq, b, h * d)  # [l, b, hp*d]
