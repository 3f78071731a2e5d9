"""NVIDIA sequence parallelism (Korthikanti et al. 2022) as configuration of Megatron-Core.

Tensor parallelism of degree N (`ColumnParallelLinear` / `RowParallelLinear`, vocabulary-parallel
embedding, output layer and cross-entropy) with ``sequence_parallel=True``: LayerNorm, dropout and
residual regions hold l/N tokens, and Megatron's own mappings all-gather the sequence before each
tensor-parallel region and reduce-scatter after it. Nothing here reimplements Megatron: the mode
is its local GPT layer spec with a LayerNorm that accepts sequence parallelism when apex is absent
(`compat.cpu.sequence_parallel_norm`) and the run's attention kernel (as serial's), plus a guard that the model really runs with TP = N and
``sequence_parallel=True``. Its configuration limits are in `nvidia_sp_limits.py`.

Same seed -> same master weights as serial and LSS (`use_cpu_initialization=True` draws the full
weight and keeps this rank's shard), same data and loss, so losses agree step by step.
"""

from __future__ import annotations

import copy

from lss_megatron.modes import Mode

from .nvidia_sp_limits import problems


def layer_spec(model, kernel: str = "flash"):
    """Megatron's local GPT layer spec with sequence-parallel-capable LayerNorms, wrapped as block
    submodules so the final LayerNorm is one as well; core attention per `kernel` (flash:
    `FlashCoreAttention` on this rank's h/N heads; dense: Megatron's `DotProductAttention`)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from lss_megatron.compat.cpu import sequence_parallel_norm
    from lss_megatron.model import get_serial_layer_spec

    norm = sequence_parallel_norm()
    spec = copy.deepcopy(get_serial_layer_spec(model.causal, kernel))
    spec.submodules.input_layernorm = norm
    spec.submodules.pre_mlp_layernorm = norm
    return TransformerBlockSubmodules(layer_specs=[spec] * model.num_layers, layer_norm=norm)


def verify_sequence_parallel(model, grid) -> None:
    """Refuse to run if Megatron would run something other than TP = N with sequence_parallel."""
    cfg = model.config
    if (
        not cfg.sequence_parallel
        or cfg.tensor_model_parallel_size != grid.tp_size
        or grid.tp_size < 2
    ):
        raise RuntimeError(
            "nvidia-sp asked for tensor parallelism with sequence_parallel=True but the model "
            f"was built with tensor_model_parallel_size={cfg.tensor_model_parallel_size}, "
            f"sequence_parallel={cfg.sequence_parallel} (grid TP = {grid.tp_size})"
        )


MODE = Mode(
    name="nvidia-sp",
    tensor_parallel=lambda n: n,
    context_parallel=lambda n: 1,
    layer_spec=layer_spec,
    sequence_parallel=True,
    post_build=verify_sequence_parallel,
    problems=problems,
)
