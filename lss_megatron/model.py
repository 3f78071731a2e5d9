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


def get_serial_layer_spec(causal: bool = True, kernel: str = "flash"):
    """Megatron's stock local GPT layer spec, the one-process reference; its core attention is
    Megatron's own `DotProductAttention` for the dense kernel, `FlashCoreAttention` for flash."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from .local_attention import KERNELS, FlashCoreAttention

    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; expected one of {KERNELS}")
    spec = copy.deepcopy(get_gpt_layer_local_spec())
    spec.submodules.self_attention.params["attn_mask_type"] = _attn_mask_type(causal)
    if kernel == "flash":
        spec.submodules.self_attention.submodules.core_attention = FlashCoreAttention
    return spec


def get_lss_layer_spec(causal: bool = True, kernel: str = "flash"):
    """Megatron's local GPT layer spec with `LSSCoreAttention` (running `kernel`) as its core
    attention."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    from .core_attention import LSSCoreAttention

    spec = get_serial_layer_spec(causal)
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=LSSCoreAttention, params={"kernel": kernel}
    )
    return spec


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
    names = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    return {
        "attention_kernel": attention_kernel_of(model),
        "recompute": model.config.recompute_granularity or "none",
        "dtype": names.get(dtypes.pop(), "other") if len(dtypes) == 1 else "mixed",
    }


def check_settings(model, requested: dict) -> dict:
    """`model_settings`, after checking it equals `requested` (same keys); raises RuntimeError
    naming every difference, so a run never starts with something other than what was asked."""
    ran = model_settings(model)
    diffs = [f"{k}: requested {requested[k]!r}, the model runs {ran[k]!r}"
             for k in ran if ran[k] != requested[k]]  # fmt: skip
    if diffs:
        raise RuntimeError("the built model does not run the requested settings: "
                           + "; ".join(diffs))  # fmt: skip
    return ran


def transformer_config(
    model: ModelConfig,
    *,
    context_parallel: int = 1,
    tensor_parallel: int = 1,
    sequence_parallel: bool = False,
    dtype: str = "fp32",
    recompute: str = "none",
):
    """The Megatron `TransformerConfig` for `model` (CPU-safe: every fusion off, no dropout).

    `dtype` ``bf16``: Megatron's ``bf16=True`` with bf16 ``params_dtype``. `recompute` maps to
    Megatron's own activation recompute: ``selective`` is ``recompute_granularity="selective"``
    (Megatron's default module list, the core attention), ``full`` is ``"full"`` with
    ``recompute_method="uniform"`` and ``recompute_num_layers=1`` (every layer checkpointed)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    recompute_args = {
        "none": {},
        "selective": {"recompute_granularity": "selective"},
        "full": {"recompute_granularity": "full", "recompute_method": "uniform",
                 "recompute_num_layers": 1},
    }[recompute]  # fmt: skip
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
        params_dtype=torch.bfloat16 if dtype == "bf16" else torch.float32,
        bf16=dtype == "bf16",
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
):
    """Build the `GPTModel` of `mode` on this rank, running attention `kernel` (flash / dense),
    Megatron's activation `recompute` (none / selective / full) in `dtype` (fp32 / bf16).

    Same seed -> same initial (master) weights for every mode and layout. In LSS mode the learned
    position table is cut to this rank's segment and RoPE uses global positions (positions.py).
    bf16: Megatron's mixed precision model, as its `Float16Module` makes it (``module.bfloat16()``:
    every parameter and activation bf16; the fp32 master weights are precision.py's). The wrapper
    itself is not kept: its forward only casts floating inputs (ours are token ids) and the
    output (step.py takes the loss in fp32), and it would rename every parameter ``module.*``.
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
            dtype=dtype,
            recompute=recompute,
        ),
        transformer_layer_spec=m.layer_spec(model, kernel),
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.seq_length,
        position_embedding_type="learned_absolute"
        if model.position_embedding == "learned"
        else "rope",
        share_embeddings_and_output_weights=False,
    )
    m.post_build(gpt, grid)
    if dtype == "bf16":
        gpt = gpt.bfloat16()  # after post_build: the position slices it makes convert too
    return gpt
