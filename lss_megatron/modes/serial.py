"""serial: N = 1, Megatron-Core's stock local GPT layer spec (its `DotProductAttention`): the
one-process reference every parallel mode is tested against. Its spec is also the base the other
modes change (one field for LSS and Ulysses, the norms for nvidia-sp)."""

from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType

from .base import Mode


def get_serial_layer_spec(causal: bool = True):
    """Megatron's stock local GPT layer spec (its `DotProductAttention`): the one-process reference."""
    spec = copy.deepcopy(get_gpt_layer_local_spec())
    mask = AttnMaskType.causal if causal else AttnMaskType.no_mask
    spec.submodules.self_attention.params["attn_mask_type"] = mask
    return spec


MODE = Mode(name="serial", layer_spec=lambda m, grid: get_serial_layer_spec(m.causal))
