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


def attention_kernel_of(model) -> str:
    """The attention kernel the built model runs, read back from its core attention modules:
    ``dense`` for Megatron's `DotProductAttention`, else the module's own ``kernel``. Raises if
    the layers disagree."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    kernels = {
        "dense" if isinstance(core, DotProductAttention) else getattr(core, "kernel", "unknown")
        for core in (layer.self_attention.core_attention for layer in model.decoder.layers)
    }
    if len(kernels) != 1:
        raise RuntimeError(f"the model's layers run different attention kernels: {kernels}")
    return kernels.pop()


def model_settings(model) -> dict:
    """``attention_kernel``, ``recompute`` and ``dtype`` the built model really runs, read back
    from its modules, its Megatron config and its parameters."""
    dtypes = {p.dtype for p in model.parameters()}
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return {
        "attention_kernel": attention_kernel_of(model),
        "recompute": model.config.recompute_granularity or "none",
        "dtype": names.get(dtypes.pop(), "other") if len(dtypes) == 1 else "mixed",
    }


def check_settings(model, requested: dict) -> dict:
    """`model_settings`, after checking it equals `requested` (same keys); raises RuntimeError
    naming every difference, so a run never starts with something other than what was asked."""
    ran = model_settings(model)
    diffs = [
        f"{k}: requested {requested[k]!r}, the model runs {ran[k]!r}"
        for k in ran
        if ran[k] != requested[k]
    ]
    if diffs:
        raise RuntimeError(
            "the built model does not run the requested settings: " + "; ".join(diffs)
        )
    return ran


def transformer_config(
    model: ModelConfig,
    *,
    context_parallel: int = 1,
    tensor_parallel: int = 1,
    sequence_parallel: bool = False,
    dtype: str = "fp32",
    recompute: str = "none",
) -> TransformerConfig:
    """The Megatron `TransformerConfig` for `model` (CPU-safe: every fusion off, no dropout).

    `dtype` ``bf16``: Megatron's ``bf16=True`` with bf16 ``params_dtype``. `recompute` maps to
    Megatron's own activation recompute: ``selective`` is ``recompute_granularity="selective"``
    (Megatron's default module list, the core attention), ``full`` is ``"full"`` with
    ``recompute_method="uniform"`` and ``recompute_num_layers=1`` (every layer checkpointed)."""
    recompute_args = {
        "none": {},
        "selective": {"recompute_granularity": "selective"},
        "full": {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        },
    }[recompute]
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
        params_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32),
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **recompute_args,
    )


def build_model(
    model: ModelConfig,
    grid: Grid,
    *,
    mode: str,
    seed: int,
    kernel: str = "flash",
    recompute: str = "none",
    dtype: str = "fp32",
    reset_position_ids: bool = False,
) -> GPTModel:
    """Build the `GPTModel` of `mode` on this rank, running attention `kernel` (flash / dense),
    Megatron's activation `recompute` (none / selective / full) in `dtype` (fp32 / bf16).

    Same seed -> same initial (master) weights for every mode and layout. In LSS mode the learned
    position table is cut to this rank's segment and RoPE uses global positions (lss/positions.py);
    with tensor parallelism (LSS x TP) Megatron's TP runs with ``sequence_parallel`` inside each
    sequence rank.
    bf16: Megatron's mixed precision model, as its `Float16Module` makes it (``module.bfloat16()``:
    every parameter and activation bf16; the fp32 master weights are training/optim.py's). The wrapper
    itself is not kept: its forward only casts floating inputs (ours are token ids) and the
    output (training/micro_batches.py takes the loss in fp32), and it would rename every parameter ``module.*``.
    `reset_position_ids` (Megatron-LM's ``--reset-position-ids``): positions restart in every
    document, so any rank may look up any row of a learned position table; every rank then keeps
    the whole table (a replicated parameter, averaged over all ranks) instead of its segment's
    rows.
    """
    cpu.apply()
    m = get_mode(mode)
    by_tp = m.degree_group == "tensor"
    n, t = (grid.tp_size, 1) if by_tp else (grid.seq_size, grid.tp_size)
    if (t > 1 and not m.composes_with_tp) or (
        m.context_parallel(n),
        m.tensor_parallel(n, t),
    ) != (grid.seq_size, grid.tp_size):
        raise ValueError(f"build_model: mode {mode!r} does not match the grid {grid}")
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    gpt = GPTModel(
        config=transformer_config(
            model,
            context_parallel=grid.seq_size,
            tensor_parallel=grid.tp_size,
            sequence_parallel=m.sequence_parallel or grid.tp_size > 1,
            dtype=dtype,
            recompute=recompute,
        ),
        transformer_layer_spec=m.layer_spec(model, grid, kernel),
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.seq_length,
        position_embedding_type="learned_absolute"
        if model.position_embedding == "learned"
        else "rope",
        share_embeddings_and_output_weights=False,
    )
    full_table = getattr(getattr(gpt, "embedding", None), "position_embeddings", None)
    m.post_build(gpt, grid)
    if reset_position_ids and full_table is not None:
        gpt.embedding.position_embeddings = full_table  # the whole table, replicated
    if dtype == "bf16":
        gpt = gpt.bfloat16()  # after post_build: the position slices it makes convert too
    elif dtype == "fp16":
        gpt = gpt.half()  # Megatron's Float16Module under --fp16, likewise after post_build
    return gpt
