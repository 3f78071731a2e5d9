"""The Megatron-Core `GPTModel` builder for every mode.

The model is Megatron's own `GPTModel` with its local (no TransformerEngine) layer spec; a mode
(modes/) says which spec (LSS changes exactly one field of it, `SelfAttentionSubmodules.
core_attention`) and what to change on the built model (LSS: sequence-distributed positions).
Megatron's files are never edited or copied.

Initial weights depend only on the seed: `use_cpu_initialization=True` draws every master weight
from the CPU generator in the same order on every rank, whatever the layout.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_config import TransformerConfig

from .compat import cpu
from .config import ModelConfig
from .modes import get_mode
from .parallel.grid import Grid


def transformer_config(
    model: ModelConfig,
    *,
    context_parallel: int = 1,
    tensor_parallel: int = 1,
    sequence_parallel: bool = False,
    params_dtype=torch.float32,
) -> TransformerConfig:
    """The Megatron `TransformerConfig` for `model` (CPU-safe: every fusion off, no dropout)."""
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


def build_model(model: ModelConfig, grid: Grid, *, mode: str, seed: int) -> GPTModel:
    """Build the `GPTModel` of `mode` (one of `config.MODES`) on this rank.

    Same seed -> same initial (master) weights for every mode and layout. In LSS mode the learned
    position table is cut to this rank's segment and RoPE uses global positions (lss/positions.py);
    with tensor parallelism (LSS x TP) Megatron's TP runs with ``sequence_parallel`` inside each
    sequence rank.
    """
    cpu.apply()
    m = get_mode(mode)
    by_tp = m.rules.degree_group == "tensor"
    n, t = (grid.tp_size, 1) if by_tp else (grid.seq_size, grid.tp_size)
    if (t > 1 and not m.rules.composes_with_tp) or \
            (m.rules.context_parallel(n), m.rules.tensor_parallel(n, t)) != \
            (grid.seq_size, grid.tp_size):  # fmt: skip
        raise ValueError(f"build_model: mode {mode!r} does not match the grid {grid}")
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    gpt = GPTModel(
        config=transformer_config(
            model,
            context_parallel=grid.seq_size,
            tensor_parallel=grid.tp_size,
            sequence_parallel=m.rules.sequence_parallel or grid.tp_size > 1,
        ),
        transformer_layer_spec=m.layer_spec(model, grid),
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.seq_length,
        position_embedding_type="learned_absolute"
        if model.position_embedding == "learned"
        else "rope",
        share_embeddings_and_output_weights=False,
    )
    m.post_build(gpt, grid)
    return gpt
