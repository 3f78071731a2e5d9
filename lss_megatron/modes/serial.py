"""serial: N = 1, Megatron-Core's stock local GPT layer spec (its `DotProductAttention`): the
one-process reference every parallel mode is tested against. Its spec is also the base the other
modes change (one field for LSS and Ulysses, the norms for nvidia-sp)."""

from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType

from ..lss.core_attention import KERNELS, FlashCoreAttention
from .base import Mode


def get_serial_layer_spec(causal: bool = True, kernel: str = "flash"):
    """Megatron's stock local GPT layer spec, the one-process reference; its core attention is
    Megatron's own `DotProductAttention` for the dense kernel, `FlashCoreAttention` for flash
    (``--attention-kernel``)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; expected one of {KERNELS}")
    spec = copy.deepcopy(get_gpt_layer_local_spec())
    mask = AttnMaskType.causal if causal else AttnMaskType.no_mask
    spec.submodules.self_attention.params["attn_mask_type"] = mask
    if kernel == "flash":
        spec.submodules.self_attention.submodules.core_attention = FlashCoreAttention
    return spec


MODE = Mode(
    name="serial",
    layer_spec=lambda m, grid, kernel="flash": get_serial_layer_spec(m.causal, kernel),
)
