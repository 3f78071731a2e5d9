"""Layer specs and the Megatron-Core `GPTModel` builder for every mode.

The model is Megatron's own `GPTModel` with its local (no TransformerEngine) layer spec; LSS
changes exactly one field of it, `SelfAttentionSubmodules.core_attention`, and then makes the
positional encoding sequence-distributed. Megatron's files are never edited or copied.

Initial weights depend only on the seed: `use_cpu_initialization=True` draws every master weight
from the CPU generator in the same order on every rank, whatever the layout.
"""

from __future__ import annotations

import copy

import torch

from .config import ModelConfig
from .grid import Grid


def _attn_mask_type(causal: bool):
    from megatron.core.transformer.enums import AttnMaskType

    return AttnMaskType.causal if causal else AttnMaskType.no_mask


def get_serial_layer_spec(causal: bool = True):
    """Megatron's stock local GPT layer spec (its `DotProductAttention`): the one-process reference."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = copy.deepcopy(get_gpt_layer_local_spec())
    spec.submodules.self_attention.params["attn_mask_type"] = _attn_mask_type(causal)
    return spec


def get_lss_layer_spec(causal: bool = True):
    """Megatron's local GPT layer spec with `LSSCoreAttention` as its core attention."""
    from .core_attention import LSSCoreAttention

    spec = get_serial_layer_spec(causal)
    spec.submodules.self_attention.submodules.core_attention = LSSCoreAttention
    return spec


def transformer_config(
    model: ModelConfig,
    *,
    context_parallel: int = 1,
    tensor_parallel: int = 1,
    sequence_parallel: bool = False,
    params_dtype=torch.float32,
):
    """The Megatron `TransformerConfig` for `model` (CPU-safe: every fusion off, no dropout)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_heads,
        num_query_groups=model.kv_heads,
        ffn_hidden_size=model.ffn_size,
        kv_channels=model.head_dim,
        tensor_model_parallel_size=tensor_parallel,
        context_parallel_size=context_parallel,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=params_dtype,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def build_model(model: ModelConfig, grid: Grid, *, mode: str, seed: int):
    """Build the `GPTModel` of `mode` ("serial", "lss" or "nvidia-sp") on this rank.

    Same seed -> same initial (master) weights for every mode and layout. In LSS mode the learned
    position table is cut to this rank's segment and RoPE uses global positions (positions.py).
    """
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel

    from .compat import cpu
    from .modes import get_mode

    cpu.apply()
    m = get_mode(mode)
    n = max(grid.seq_size, grid.tp_size)
    if (m.context_parallel(n), m.tensor_parallel(n)) != (grid.seq_size, grid.tp_size):
        raise ValueError(f"build_model: mode {mode!r} does not match the grid {grid}")
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    gpt = GPTModel(
        config=transformer_config(
            model,
            context_parallel=grid.seq_size,
            tensor_parallel=grid.tp_size,
            sequence_parallel=m.sequence_parallel,
        ),
        transformer_layer_spec=m.layer_spec(model),
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.seq_length,
        position_embedding_type="learned_absolute"
        if model.position_embedding == "learned"
        else "rope",
        share_embeddings_and_output_weights=False,
    )
    m.post_build(gpt, grid)
    return gpt
